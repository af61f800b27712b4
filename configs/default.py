"""The embedded default: HML on cluttered digit composites (no download), single positive labels.

Every number from the paper or a peer names its source; the rest were chosen for this dataset
(docs/methods.md "Implementation notes" says how).
"""
import ml_collections


def get_config():
  config = ml_collections.ConfigDict()

  # Every dataset key any dataset reads (one union; each comment says which read it). The paper's
  # four set theirs in configs/paper.py, a folder in configs/folder.py, features in
  # configs/features.py.
  config.dataset = ml_collections.ConfigDict()
  config.dataset.name = 'composite_digits'  # all: hml_jax/datasets/registry.py
  config.dataset.builder_config = 'default'  # TFDS builders: 'default', 'tiny' for tests
  config.dataset.data_dir = ''  # TFDS builders: '' = TFDS's default (~/tensorflow_datasets)
  # The paper's four: the extracted original files; '' = <data_dir>/downloads/manual.
  config.dataset.manual_dir = ''
  config.dataset.path = ''  # folder: the folder holding train.csv; features: the .npz file
  # Pixel normalization: (x / 255 - mean) / std. ImageNet's for photos; the digits are grayscale.
  config.dataset.mean = (0.5,)
  config.dataset.std = (0.5,)
  # TFDS builders and folder: True holds the decoded images in memory (the embedded datasets);
  # False streams the encoded ones: the generated datasets (array_record) with grain
  # (hml_jax/data/grain_splits.py), the paper's datasets and folder with tf.data (splits.py).
  config.dataset.in_memory = True
  # Streamed images: random horizontal flips; tf.data: the encoded images held by the shuffle
  # buffer and the parallel decodes (-1 = tf.data.AUTOTUNE); grain: the decoding worker
  # processes (-1: the cores beyond two, at most 16; 0: a thread of the training process).
  config.dataset.augment_flip = True
  config.dataset.shuffle_buffer = 10000
  config.dataset.parallel_calls = -1
  config.dataset.workers = -1
  # Streamed images and predict: 'pil' (Cole et al.'s exact preprocessing) or 'tensorflow'
  # (hml_jax/data/decoders.py DECODERS).
  config.dataset.decoder = 'pil'
  # Images from files (streamed, folder, predict): a header that declares more pixels is refused
  # before decoding; PIL's default Image.MAX_IMAGE_PIXELS, ~256 MiB of RGB.
  config.dataset.max_image_pixels = 89_478_485
  # folder: skip images that do not decode (and count them); let CSV names leave the folder;
  # without test.csv, this share of train.csv (seeded) is the test split.
  config.dataset.skip_corrupt = False
  config.dataset.allow_outside_paths = False
  config.dataset.test_fraction = 0.2
  config.dataset.test_seed = 0
  # features: 'none', 'standardize' (each dimension by the training rows' mean and std) or 'l2'
  # (input_pipeline.FEATURE_STANDARDIZATIONS).
  config.dataset.standardize = 'none'

  config.model = 'resnet_small'
  # The backbone's initial weights (hml_jax/init_from/torchvision.py): '' = random, 'embedded:NAME' (shipped
  # in hml_jax/weights/), 'torchvision:resnet50' (ImageNet), 'torchvision:/path/file.pth',
  # 'workdir:DIR' (another run's best checkpoint).
  config.init_from = ''
  config.image_size = 48
  config.half_precision = False
  # How convolutions are computed (hml_jax/models/layers.py); the parameters are the same, so it
  # may change between runs and on resume. 'auto': as matmuls where that is faster on CPU
  # (docs/history.md), XLA's native convolutions on GPU and TPU.
  config.convolutions = 'auto'

  # 'hml' (adaptive s*, m*), 'hml_fixed' (config.scale, config.margin), 'normalized_sigmoid'
  # (Eq. 3), and the baselines 'an' (linear head + BCE), 'bce', 'an_ls', 'bce_ls', 'wan', 'epr',
  # 'em', 'asl' (hml_jax.methods.METHODS).
  config.loss = 'hml'
  config.scale = 20.0  # s: the paper's best fixed pair, Sec. 4.5 / Fig. 5 (VOC, single pos.)
  config.margin = 0.3  # m: idem; for 'hml' the initial values of s*, m*
  # How s* and m* ('hml') are learned (docs/methods.md, "How s* and m* are learned"; measured in
  # docs/results.md, "s* and m* from any start"). Eq. 6 alone is one equation in two unknowns, so
  # by default m* follows Eq. 6 and s* a second equation: the scale at which the batch's margin
  # logits s*cos(theta+m*) have standard deviation config.logit_spread ('spread'; 1.1 chosen on
  # validation over {1.0, 1.1, 1.2, 1.3}, two feature sets). 'balance': both by Eq. 6 (the
  # paper's literal reading).
  config.adaptive_scale = 'spread'
  config.logit_spread = 1.1
  # Their optimizer. 'log' (default): their own Adam at config.adaptive_learning_rate with s*
  # stepped in log space (about 1% of s* per step at 1e-2, whatever its size); 'separate': their
  # own plain Adam; 'shared': the network's Adam and learning rate. The paper's literal reading is
  # adaptive_scale='balance', adaptive_optimizer='separate' (or 'shared'), adaptive_learning_rate=1e-3.
  config.adaptive_optimizer = 'log'
  config.adaptive_learning_rate = 1e-2

  # Where the margin goes (paper Table 5): 'both' (the paper's choice), 'positives', 'negatives',
  # 'none'. With one group only, test scores have no margin (labels are unknown at test time).
  config.margin_on = 'both'

  # Hyperparameters of the baselines (config.loss in hml_jax.methods.METHODS), named as in their
  # published code.
  config.ls_coef = 0.1  # an_ls / bce_ls: Cole et al. (CVPR 2021)
  config.expected_num_pos = -1.0  # epr: k; Cole et al. use VOC 1.5, COCO 2.9, NUS 1.9, CUB 31.4.
  # < 0: the mean number of positives per training image (logged)
  config.alpha = 0.2  # em, em_apl: Zhou et al. (ECCV 2022), their VOC value (not tuned)
  config.beta = 0.02  # em_apl: idem, weight of the pseudo-labels
  config.warmup_epoch = 5  # em_apl: idem, first epoch after which pseudo-labels are added
  config.neg_proportion = 0.9  # em_apl: idem, share of each class's unknowns pseudo-labelled
  config.gamma_neg = 4.0  # asl: Ridnik et al. (ICCV 2021), their train.py
  config.gamma_pos = 0.0  # asl: idem
  config.clip = 0.05  # asl: idem
  # ll_r / ll_ct / ll_cp: percent per epoch by which the clean rate falls (Kim et al., CVPR
  # 2022); >= 0 applies to every variant, < 0 takes each variant's value of delta_rel_by_method
  # (Kim et al.'s defaults here; the paper configs set their per-dataset values).
  config.delta_rel = -1.0
  config.delta_rel_by_method = {'ll_r': 0.5, 'll_ct': 0.2, 'll_cp': 0.1}
  config.role_lr_mult = 10.0  # role: the label estimator's learning rate multiplier (Cole et al.)

  # How each method is trained (hml_jax/methods/recipes.py, docs/methods.md). 'shared': every method in
  # the same loop (here: the fairer comparison on the embedded data, where no one published a
  # recipe); 'published': as its authors trained it (the paper configs): Cole et al.'s linear
  # init for ROLE and AN-LS, Kim et al.'s 10x head learning rate and 3-point early stop for LL-*,
  # Zhou et al.'s early stop at the first epoch without a better validation mAP for EM, EM+APL.
  config.recipe = 'shared'
  # Each part of the recipe on its own; < 0 takes the recipe's value.
  config.linear_init_epochs = -1  # the head alone on frozen features first (0: no)
  config.linear_init_learning_rate = -1.0
  config.linear_init_batch_size = -1
  config.head_learning_rate_multiplier = -1.0  # the head's learning rate over the backbone's
  config.early_stopping_patience = -1  # epochs without a new best val mAP (0: never stop)
  config.early_stopping_drop = -1.0  # val mAP points below the best (0: never stop)

  # 'full'; 'partial_positive' (the paper's partial positive labels, Sec. 4.3 / Fig. 4:
  # config.positive_fraction of all positives of the split, so images may keep none); 'partial'
  # (that fraction of each image's positives, at least one per image); 'single_positive'.
  config.label_scenario = 'single_positive'
  config.positive_fraction = 0.5  # for the two partial scenarios (Fig. 4 varies it)
  config.label_seed = 1200  # Cole et al. (CVPR 2021), generate_observed_labels.py
  config.validation_fraction = 0.2  # Cole et al.: 20% of the official train split
  config.validation_seed = 1200  # Cole et al.

  # Training augmentation: random translation by up to this many pixels (not flips: a mirrored
  # digit is another symbol). Without it the small model memorizes the 8,000 training images.
  config.augment_max_shift = 4

  config.optimizer = 'adam'  # the paper's optimizer (Sec. 4.1)
  config.learning_rate = 1e-3
  # The step schedule of He et al.'s ResNet: after each of these (1-based) epochs the learning
  # rate is multiplied by learning_rate_decay_factor. () keeps it constant, as the paper does.
  config.learning_rate_decay_epochs = ()
  config.learning_rate_decay_factor = 0.1
  config.batch_size = 32
  config.eval_batch_size = 256
  config.num_epochs = 10  # the paper trains 10 epochs and keeps the best by validation
  config.seed = 0  # initialization and data order
  # Paper Fig. 2 per epoch: the false negatives' mean probability and share of the negative side's
  # gradient on this many training images (results.json, TensorBoard); 0: not measured.
  config.false_negative_images = 0

  # A step whose loss or gradient is NaN/Inf is never applied; 'stop' ends training with an error
  # naming the step and the quantity (the last checkpoint is kept), 'skip' goes on and counts
  # such steps (results.json: skipped_steps per epoch).
  config.nonfinite = 'stop'

  # How the train state (parameters, BatchNorm statistics, optimizer state, label state) is laid
  # out over the devices (hml_jax/state/sharding.py): 'replicated' (every device holds all of it) or
  # 'fsdp' (each array of at least fsdp_min_size elements is split over the devices along its
  # largest dimension they divide, e.g. a 2048 x 5000 label-embedding matrix and ResNet-50's big
  # convolution kernels: per-device memory for them and their Adam moments falls by the device
  # count, at the price of an all-gather per use). A layout only: a run may resume in the other.
  config.parameter_sharding = 'replicated'
  # 2**16 elements (256 KiB in float32): in ResNet-50 the 42 of its 160 parameter arrays above it
  # hold 98.5% of the weights; the rest (BatchNorm vectors, small early kernels, s*, m*, step
  # counters) would save under 1.5% of the memory split up, yet each would cost a collective.
  config.fsdp_min_size = 2**16

  config.log_every_steps = 20
  config.checkpoints_to_keep = 2
  return config
