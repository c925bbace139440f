"""Kernel tests load real BPF programs: they need root and a BPF-capable kernel."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.conftest import test_backend, test_shard
from tests.kernel.stack import kernel_preempts

# Seconds each module took per pass (one pytest, measured with
# --durations=0): the weights that balance the two shards. Guests:
# the fentry pass under QEMU TCG (Debian 6.1; ground truth from 6.12, where
# drgn runs). Host: 6.18, where the image, wheel, top and Prometheus tests
# run in the auto pass only. A module missing here weighs DEFAULT_SECONDS;
# the split stays deterministic.
PASS_SECONDS = {
    "guest": {
        "test_adhoc.py": 260, "test_backends_agree.py": 257, "test_ground_truth.py": 200,
        "test_serve.py": 103, "test_tree.py": 86, "test_storm.py": 50,
        "test_reuse_replay.py": 40, "test_state_vs_model.py": 39, "test_exit_window.py": 29,
        "test_map_full.py": 26, "test_check_and_transport.py": 22, "test_wire_format.py": 19,
        "test_lifecycle.py": 19, "test_rmapwalk.py": 17,
        # Host-only: they skip in their fixtures, in no time.
        "test_image.py": 0, "test_wheel.py": 0, "test_serve_privileges.py": 0,
        "test_serve_security.py": 0, "test_top.py": 0,
    },
    "host-auto": {
        "test_serve.py": 150, "test_adhoc.py": 66, "test_storm.py": 54, "test_image.py": 36,
        "test_top.py": 36, "test_serve_privileges.py": 24, "test_serve_security.py": 22,
        "test_wheel.py": 18, "test_check_and_transport.py": 15, "test_state_vs_model.py": 14,
        "test_tree.py": 14, "test_map_full.py": 11, "test_exit_window.py": 10,
        "test_lifecycle.py": 5, "test_reuse_replay.py": 4, "test_wire_format.py": 3,
        "test_rmapwalk.py": 3,
    },
    "host-tracepoint": {
        "test_adhoc.py": 50, "test_storm.py": 43, "test_serve.py": 30, "test_top.py": 29,
        "test_state_vs_model.py": 11, "test_check_and_transport.py": 10,
        "test_exit_window.py": 8, "test_map_full.py": 8, "test_lifecycle.py": 5,
        "test_reuse_replay.py": 3, "test_wire_format.py": 3, "test_tree.py": 0,
        "test_image.py": 0, "test_wheel.py": 0, "test_serve_security.py": 0,
        "test_serve_privileges.py": 0, "test_rmapwalk.py": 0,
    },
}
DEFAULT_SECONDS = 60


def _pass_weights() -> dict[str, int]:
    if os.environ.get("ANONTRACE_GUEST"):
        return PASS_SECONDS["guest"]
    return PASS_SECONDS.get(f"host-{test_backend()}", PASS_SECONDS["host-auto"])


def shard_modules(names: set[str], shards: int) -> list[set[str]]:
    """Split test modules into ``shards`` sets of about equal guest time,
    heaviest first onto the lightest shard. Whole modules, because their
    module-scoped fixtures (one traced family, one serve) are shared."""
    weights = _pass_weights()
    out: list[set[str]] = [set() for _ in range(shards)]
    load = [0.0] * shards
    for name in sorted(names, key=lambda n: (-weights.get(n, DEFAULT_SECONDS), n)):
        i = load.index(min(load))
        out[i].add(name)
        load[i] += weights.get(name, DEFAULT_SECONDS)
    return out


def _skipped(item: pytest.Item) -> bool:
    if item.get_closest_marker("skip") is not None:
        return True
    return any(m.args and m.args[0] is True for m in item.iter_markers("skipif"))


def _keep_shard(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Deselect the kernel tests of the other shards. Only modules with a
    test to run in this pass are balanced; wholly skipped ones go to the
    first shard, which reports their skips once."""
    shard = test_shard()
    if shard is None:
        return
    here = Path(__file__).parent
    ours = [i for i in items if here in Path(str(i.path)).parents]
    running = {Path(str(i.path)).name for i in ours if not _skipped(i)}
    mine = shard_modules(running, shard[1])[shard[0] - 1]
    if shard[0] == 1:
        mine |= {Path(str(i.path)).name for i in ours} - running
    other = [i for i in ours if Path(str(i.path)).name not in mine]
    if other:
        config.hook.pytest_deselected(items=other)
        items[:] = [i for i in items if i not in other]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # In the QEMU guests "auto" resolves to fentry, or to kprobes where the
    # kernel can preempt fentry programs (sid's 7.2: auto_order), and that
    # method's pass runs every test already: the auto pass runs only what is
    # about the automatic choice (CI time budget: each guest pass costs
    # about ten minutes). In the other method's pass, tests of what does not
    # depend on the attach method (user-space logic, map handling shared by
    # every backend) are left to auto's method; the other pass runs what its
    # own programs decide.
    guest = bool(os.environ.get("ANONTRACE_GUEST"))
    preferred = "kprobe" if guest and kernel_preempts() else "fentry"
    guest_auto = guest and test_backend() == "auto"
    # sid's 7.2 also runs a tracepoint pass (scripts/test.sh): its kmem
    # programs have second copies there (docs/state.md "Recursion misses").
    guest_other = guest and test_backend() in ("fentry", "kprobe", "tracepoint") and \
        test_backend() != preferred
    skip_auto = pytest.mark.skip(reason=f"in the guests auto resolves to {preferred}: the "
                                 f"{preferred} pass runs this test (CI time budget)")
    skip_other = pytest.mark.skip(reason="does not depend on the attach method: the guests' "
                                  f"{preferred} pass (auto's method here) runs it "
                                  "(CI time budget)")
    # Where fentry is not auto's method (the kernel preempts fentry
    # programs and counts the runs it skips as lost), the fentry and
    # tracepoint passes run the traced family and the storm only
    # (preempted_pass): that each works there and reports its losses.
    skip_fentry = pytest.mark.skip(reason=f"this kernel preempts our programs, so auto takes "
                                   f"kprobes: the {test_backend()} pass runs the family and "
                                   "storm tests only (docs/state.md 'Preemption'; CI time "
                                   "budget)")
    here = Path(__file__).parent
    for item in items:
        # The hook sees every collected test of the session, not only ours.
        if here not in Path(str(item.path)).parents:
            continue
        item.add_marker(pytest.mark.kernel)
        if guest_auto and item.get_closest_marker("auto_pass") is None:
            item.add_marker(skip_auto)
        elif guest_other and preferred == "kprobe":
            if (item.get_closest_marker("auto_pass") is None
                    and item.get_closest_marker("preempted_pass") is None):
                item.add_marker(skip_fentry)
        elif guest_other and item.get_closest_marker("method_agnostic") is not None:
            item.add_marker(skip_other)
    _keep_shard(config, items)


@pytest.fixture(autouse=True, scope="session")
def _root() -> None:
    if os.geteuid() != 0:
        pytest.fail("kernel tests load BPF programs and must run as root")
