"""Shared base of the paper's four datasets (configs/voc.py, coco.py, cub.py, nus.py).

The protocol of Cole et al. (CVPR 2021), which HML follows (paper Sec. 4.1): observed labels for
the whole official train split (seed 1200), 20% of it for validation (seed 1200), images resized
to 448x448, random horizontal flips, ImageNet mean/std, ResNet-50, Adam, 10 epochs, the best
epoch by validation mAP. Learning rate and batch size come from the grid {1e-2, 1e-3, 1e-4, 1e-5}
x {8, 16} (hml_jax.compare --learning_rates --batch_sizes); the paper does not state its picks.
"""
from hml_jax.configs import default


def get_config(dataset_name: str):
  config = default.get_config()
  config.dataset.name = dataset_name  # a TFDS builder in hml_jax/datasets/
  config.dataset.builder_config = ''
  # The extracted original files (each builder's MANUAL_DOWNLOAD_INSTRUCTIONS says which go
  # where); '' = TFDS's default, <data_dir>/downloads/manual.
  config.dataset.manual_dir = ''
  config.dataset.in_memory = False  # stream JPEGs with tf.data (splits.ImageSplit)
  config.dataset.augment_flip = True  # Cole et al.: RandomHorizontalFlip(0.5) for training
  # Encoded images held by the shuffle buffer (files are also read in a seeded order): 10,000
  # COCO JPEGs are about 1.6 GB of host memory.
  config.dataset.shuffle_buffer = 10000
  config.dataset.parallel_calls = -1  # decode + resize in parallel; -1 = tf.data.AUTOTUNE
  # 'pil': Cole et al.'s exact preprocessing (PIL decode + torchvision's Resize) and the faster
  # per core; 'tensorflow' (TF's C++ ops, no GIL) for a host with many cores per process.
  # hml_jax/data/decoders.py DECODERS; docs/datasets.md "The input pipeline".
  config.dataset.decoder = 'pil'
  # Images whose header declares more pixels are refused before they are decoded (a few KB of
  # PNG can declare 130 million): PIL's default Image.MAX_IMAGE_PIXELS, ~256 MiB of RGB.
  # (The embedded datasets are generated here and need no limit; predict applies it too.)
  config.dataset.max_image_pixels = 89_478_485
  config.dataset.mean = (0.485, 0.456, 0.406)  # ImageNet statistics (Cole et al.)
  config.dataset.std = (0.229, 0.224, 0.225)

  config.model = 'resnet50'  # the paper's backbone (Sec. 4.1)
  # ImageNet weights, as the paper and every baseline start from (Sec. 4.1; Cole et al. load
  # torchvision's resnet50(pretrained=True)): torchvision's ResNet50_Weights.IMAGENET1K_V1, from
  # the cache or downloaded once (hml_jax/init_from/torchvision.py). A model of another depth takes
  # 'torchvision:resnet18' / 34 / 101; 'torchvision:/path/file.pth' (or .safetensors) reads one's
  # own; '' trains from scratch (far below the paper's numbers).
  config.init_from = 'torchvision:resnet50'
  config.image_size = 448  # Cole et al.
  config.augment_max_shift = 0  # photos are flipped, not shifted
  config.learning_rate = 1e-5  # from the grid; Zhou et al.'s and Kim et al.'s choice
  config.batch_size = 8  # from the grid {8, 16}
  config.eval_batch_size = 64
  config.num_epochs = 10  # paper Sec. 4.1
  # Each baseline trained as its authors did (hml_jax/methods/recipes.py); HML itself in the shared loop
  # the paper describes (Sec. 4.1).
  config.recipe = 'published'
  config.log_every_steps = 100
  return config
