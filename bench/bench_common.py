"""What every bench shares, so that its ratios can be trusted (issue 18).

- The machine's load over a measurement (`snapshot`, `load_since`): the
  1-minute load average before and after, and the CPU that other processes
  took meanwhile (Linux /proc/stat). A ratio measured while something else
  competes for the cores is printed flagged, "(load X: not comparable)",
  never bare (`ratio_text`).
- The matmul peak of a precision (`matmul_peaks`): float32 and bfloat16
  square matmuls, eager, in a `tf.function` and compiled with XLA, measured in
  the bench's own process, so that a model's FLOP/s is put against the peak of
  the precision it computes in.
- Interleaved timing (`interleaved`): ours and the peer's calls alternate, so
  that load from elsewhere falls on both alike; min and median of >= 3
  repeats.
"""

import dataclasses
import os
import statistics
import time
import typing

import tensorflow as tf

import utils

# Above this 1-minute load per core (1.5 on the 2-core development machine)
# other work is taking enough of the CPU to move a ratio: issue 18 saw
# faiss' exact search fall 30-fold at load 5.
MAX_LOAD_PER_CORE = 0.75
MIN_REPEATS = 3
PEAK_MODES = ("eager", "tf.function", "xla")
PRECISIONS = ("float32", "bfloat16")


# ---------------------------------------------------------------------------
# Load
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Snapshot:
  """The clocks a load figure is the difference of."""
  wall_seconds: float
  load_1min: float
  # Non-idle CPU seconds of the whole machine; None without /proc/stat.
  busy_cpu_seconds: typing.Optional[float]
  # This process's CPU seconds (all threads) and its finished children's.
  own_cpu_seconds: float


def _busy_cpu_seconds():
  """Seconds the machine's CPUs spent not idle since boot (Linux), or None."""
  try:
    with open("/proc/stat", encoding="ascii") as f:
      ticks = [int(t) for t in f.readline().split()[1:]]
  except (OSError, ValueError):
    return None
  # user nice system idle iowait irq softirq steal (guest time is already
  # counted in user and nice).
  busy = sum(ticks[:8]) - ticks[3] - ticks[4]
  return busy / os.sysconf("SC_CLK_TCK")


def snapshot():
  times = os.times()
  return Snapshot(
      wall_seconds=time.perf_counter(), load_1min=os.getloadavg()[0],
      busy_cpu_seconds=_busy_cpu_seconds(),
      own_cpu_seconds=(time.process_time() + times.children_user +
                       times.children_system))


@dataclasses.dataclass(frozen=True)
class Load:
  """The machine's load over a measurement and whether its ratios hold."""
  before: float  # 1-minute load average at the start
  after: float  # ... at the end; it counts this process too
  # Cores' worth of CPU that other processes used meanwhile; None: unknown.
  others_cores: typing.Optional[float]
  cores: int

  @property
  def competing(self):
    """The load other work put on the cores during the measurement: the
    load that explains the CPU others got (the load average before when
    /proc/stat cannot say).

    A bench keeps every core busy, so other processes wanting L cores get
    cores * L / (cores + L) of them: L = cores * o / (cores - o) for the o
    cores they got. The load averages cannot say it: a minute-long average,
    they count the bench's own threads, those of its earlier parts too.
    """
    if self.others_cores is None:
      return self.before
    others = min(max(self.others_cores, 0.0), 0.99 * self.cores)
    return self.cores * others / (self.cores - others)

  @property
  def comparable(self):
    return self.competing <= MAX_LOAD_PER_CORE * self.cores

  def describe(self):
    others = ("" if self.others_cores is None else
              f"; other processes used {max(self.others_cores, 0.0):.2f} of "
              f"{self.cores} cores meanwhile")
    verdict = "comparable" if self.comparable else "NOT comparable"
    return (f"load (1-min) {self.before:.2f} before, {self.after:.2f} after"
            f"{others} -> load {self.competing:.2f}: {verdict} (limit "
            f"{MAX_LOAD_PER_CORE * self.cores:.2f} on {self.cores} cores)")

  def as_dict(self):
    return dict(dataclasses.asdict(self), competing=self.competing,
                comparable=self.comparable)


def load_since(start):
  """The `Load` from `start` (a `snapshot()`) to now."""
  end = snapshot()
  others = None
  if start.busy_cpu_seconds is not None and end.busy_cpu_seconds is not None:
    wall = max(end.wall_seconds - start.wall_seconds, 1e-9)
    others = ((end.busy_cpu_seconds - start.busy_cpu_seconds) -
              (end.own_cpu_seconds - start.own_cpu_seconds)) / wall
  return Load(before=start.load_1min, after=end.load_1min,
              others_cores=others, cores=os.cpu_count() or 1)


def write_results(path, results):
  """Writes a bench's results as JSON at `path` (its directory made)."""
  utils.makedirs(os.path.dirname(path) or ".")
  utils.atomic_write_json(path, results)


def ratio_text(ratio, load):
  """"1.23x", or "1.23x (load 2.4: not comparable)" when the load was high."""
  if load.comparable:
    return f"{ratio:.2f}x"
  return f"{ratio:.2f}x (load {load.competing:.1f}: not comparable)"


# ---------------------------------------------------------------------------
# Matmul peak
# ---------------------------------------------------------------------------


def matmul_peaks(size, repeats=5, precisions=PRECISIONS):
  """{precision: {mode: FLOP/s}} of a size^3 matmul, best of `repeats`.

  Modes: eager, `tf.function`, and `tf.function(jit_compile=True)` (XLA): on
  a CPU with AMX, bfloat16 through oneDNN (eager, tf.function) is far above
  float32, and XLA's CPU backend does not use it.
  """
  peaks = {}
  for precision in precisions:
    a = tf.cast(tf.random.stateless_normal([size, size], [0, 1]), precision)
    b = tf.cast(tf.random.stateless_normal([size, size], [0, 2]), precision)
    matmuls = {
        "eager": lambda a=a, b=b: tf.matmul(a, b),
        "tf.function": tf.function(lambda a=a, b=b: tf.matmul(a, b)),
        "xla": tf.function(lambda a=a, b=b: tf.matmul(a, b),
                           jit_compile=True),
    }
    timings = interleaved(matmuls, repeats)
    peaks[precision] = {mode: 2 * size**3 / timing.min
                        for mode, timing in timings.items()}
  return peaks


def best_peak(peaks, precision):
  """The practical peak of `precision`: its fastest mode."""
  return max(peaks[precision].values())


def peaks_text(peaks, size):
  """One line per precision: GFLOP/s of each mode."""
  lines = []
  for precision, by_mode in peaks.items():
    modes = ", ".join(f"{mode} {flops / 1e9:,.0f}"
                      for mode, flops in by_mode.items())
    lines.append(f"matmul peak {size}^3 {precision}: {modes} GFLOP/s "
                 f"(best {best_peak(peaks, precision) / 1e9:,.0f})")
  return "\n".join(lines)


# ---------------------------------------------------------------------------
# Interleaved timing
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Timing:
  """Seconds of each timed call, and what the last call returned."""
  seconds: tuple
  output: typing.Any

  @property
  def min(self):
    return min(self.seconds)

  @property
  def median(self):
    return statistics.median(self.seconds)


def check_repeats(repeats, flag):
  if repeats < MIN_REPEATS:
    raise utils.UserError(f"--{flag}={repeats}: expected >= {MIN_REPEATS} "
                          "(a min and a median need several runs)")


def _host(value):
  """Pulls tensors to NumPy, so that asynchronous work is inside the timing."""
  return tf.nest.map_structure(
      lambda t: t.numpy() if isinstance(t, (tf.Tensor, tf.Variable)) else t,
      value)


def interleaved(fns, repeats):
  """{name: Timing} of each no-argument fn, after one warm-up call each.

  The rounds alternate the order of the fns (forwards, then backwards), so
  that none always runs after the same other one and load from other
  processes falls on all alike.
  """
  for fn in fns.values():
    _host(fn())
  seconds = {name: [] for name in fns}
  outputs = {}
  names = list(fns)
  for round_index in range(repeats):
    for name in (names if round_index % 2 == 0 else names[::-1]):
      start = time.perf_counter()
      outputs[name] = _host(fns[name]())
      seconds[name].append(time.perf_counter() - start)
  return {name: Timing(tuple(seconds[name]), outputs[name]) for name in fns}

