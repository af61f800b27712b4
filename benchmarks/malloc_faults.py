"""Minor page faults, kernel time and images/s per train step of ResNet-50 (configs/voc.py).

  GLIBC_TUNABLES=... python benchmarks/malloc_faults.py IMAGE_SIZE BATCH_SIZE STEPS
  LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 python benchmarks/malloc_faults.py ...

One JSON line: the allocator settings it ran with, and per timed step (after 3 warm-up steps) the
process's minor page faults, its kernel (sys) seconds and the images per second. Compiled programs
are cached in /tmp/malloc_faults_cache, so that the settings compared one after another compile
once. docs/history.md, "glibc's malloc keeping freed memory", has what it measured.
"""
import os, resource, sys, time, json

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
import jax

jax.config.update('jax_compilation_cache_dir', '/tmp/malloc_faults_cache')
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from hml_jax.configs import voc
from hml_jax.tools import benchmark

size, batch, steps = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
config = voc.get_config()
config.image_size, config.batch_size = size, batch
train_fn, eval_fn, state, b, schedule, mesh = benchmark.synthetic_train_step(config)
for _ in range(3):
  state, metrics = train_fn(state, b, schedule)
jax.block_until_ready(metrics)
before = resource.getrusage(resource.RUSAGE_SELF)
start = time.perf_counter()
for _ in range(steps):
  state, metrics = train_fn(state, b, schedule)
jax.block_until_ready(metrics)
seconds = time.perf_counter() - start
after = resource.getrusage(resource.RUSAGE_SELF)
print(
    json.dumps({
        'tunables': os.environ.get('GLIBC_TUNABLES', ''),
        'preload': os.environ.get('LD_PRELOAD', ''),
        'tbb_huge_threshold': os.environ.get('TBB_MALLOC_SET_HUGE_SIZE_THRESHOLD', ''),
        'faults_per_step': (after.ru_minflt - before.ru_minflt) / steps,
        'sys_s_per_step': (after.ru_stime - before.ru_stime) / steps,
        'images_per_s': steps * batch / seconds,
        'max_rss_gib': after.ru_maxrss / 2**20,
    }))
