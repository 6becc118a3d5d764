"""The benchmark scripts' own logic: the profiler-trace summary and the plain-step schedule."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))

import common  # noqa: E402
import kernel_profile  # noqa: E402


def _meta(pid, name, tid=None):
  if tid is None:
    return {"ph": "M", "pid": pid, "name": "process_name", "args": {"name": name}}
  return {"ph": "M", "pid": pid, "tid": tid, "name": "thread_name", "args": {"name": name}}


def test_device_events_keep_only_gpu_stream_kernels():
  trace = {
    "traceEvents": [
      _meta(1, "/device:GPU:0"),
      _meta(1, "Stream #7(Compute)", tid=7),
      _meta(1, "XLA Ops", tid=8),
      _meta(2, "/host:CPU"),
      _meta(2, "python", tid=1),
      {"ph": "X", "pid": 1, "tid": 7, "name": "gemm", "ts": 0, "dur": 10.0},
      {"ph": "X", "pid": 1, "tid": 7, "name": "loop_add_fusion", "ts": 12, "dur": 2.0},
      {"ph": "X", "pid": 1, "tid": 8, "name": "dot.1", "ts": 0, "dur": 10.0},  # op line repeats it
      {"ph": "X", "pid": 2, "tid": 1, "name": "PjitFunction(step)", "ts": 0, "dur": 50.0},
      {"ph": "i", "pid": 1, "tid": 7, "name": "marker", "ts": 5},
    ]
  }
  events = kernel_profile._device_events(trace)
  assert [e["name"] for e in events] == ["gemm", "loop_add_fusion"]
  assert kernel_profile._device_events({"traceEvents": []}) == []


def test_step_kinds_leave_plain_steps_before_the_window():
  kinds = [common.step_kind(c, 10, 5) for c in range(21)]
  assert kinds[0] == "inversion" and kinds[10] == "inversion" and kinds[20] == "inversion"
  assert kinds[1:6] == ["plain"] * 5 and kinds[6:10] == ["statistics"] * 4
