"""Command line: python -m hml_jax.embedded_backbones --workdir=RUN --output=FILE.safetensors.

Writes the backbone of a finished run's best checkpoint in the format of the backbones that ship
with hml_jax (hml_jax/init_from/embedded.py), as their regeneration commands do.
"""
if __name__ == '__main__':
  # First thing, before JAX allocates: restart with a fast malloc (runtime/allocator.py).
  from hml_jax.runtime import allocator  # pylint: disable=g-import-not-at-top
  allocator.restart_with_fast_allocator()

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags

from hml_jax.init_from import embedded
from hml_jax.tools import cli

FLAGS = flags.FLAGS


def define_flags():
  flags.DEFINE_string('workdir', None, 'A finished hml_jax run whose best backbone is exported.')
  flags.DEFINE_string('output', None, 'The .safetensors file to write.')
  flags.mark_flags_as_required(['workdir', 'output'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  metadata = embedded.export_workdir(FLAGS.workdir, FLAGS.output)
  print(f'Wrote {FLAGS.output} (best epoch {metadata["best_epoch"]}, source val mAP '
        f'{metadata["source_val_map"]}), SHA-256 {embedded.sha256_of(FLAGS.output)}')


if __name__ == '__main__':
  define_flags()
  cli.run(main)
