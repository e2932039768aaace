"""``laneway serve --devices``: parsing, the plan of one worker per visible device (CUDA
indices, GPU and MIG UUIDs), and the refusals. This machine has no GPU: the plans are
checked with the device count given, and no CUDA worker is started."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from controlplane.policy_loader import load_policy
from laneway import devices
from laneway.cli import app
from laneway.devices import WorkerDevice, count_cuda_devices, parse_devices, plan_workers
from laneway.serve import child_commands
from tests.conftest import POLICIES

MIG = ["MIG-4c8b1e2a-0d7f-5a3e-9b61-2f0c7d9e8a11", "MIG-7e02aa9c-13b5-5d48-8c1f-6a9b0e3d4c22"]


def no_count() -> int:
    raise AssertionError("the devices were counted though the plan did not need it")


def counted(n: int) -> Callable[[], int]:
    """A device count this test gives (this machine has no GPU to count)."""
    return lambda: n


@pytest.mark.parametrize(("text", "choice"), [
    ("auto", "auto"), ("cpu", "cpu"), ("cuda:0", (0,)), ("cuda:1, cuda:0", (1, 0)),
])
def test_devices_parse(text: str, choice: object) -> None:
    assert parse_devices(text) == choice


@pytest.mark.parametrize(("text", "reason"), [
    ("cuda:x", "'cuda:x' is not a device"), ("gpu", "'gpu' is not a device"),
    ("cuda", "'cuda' is not a device"), ("", "'' is not a device"),
    ("cuda:0,cuda:0", "cuda:0 is given twice"), ("cuda:-1", "'cuda:-1' is not a device"),
    ("cpu,cuda:0", "'cpu' stands alone"), ("auto,cpu", "'auto' stands alone"),
])
def test_bad_devices_are_refused_saying_why(text: str, reason: str) -> None:
    with pytest.raises(ValueError, match="^" + reason.replace("(", r"\(")):
        parse_devices(text)


def test_cpu_is_one_cpu_worker_and_auto_without_a_gpu_too() -> None:
    assert plan_workers("cpu", {}, no_count) == [WorkerDevice("cpu")]
    assert plan_workers("auto", {}, counted(0)) == [WorkerDevice("cpu")]
    assert plan_workers("auto", {"CUDA_VISIBLE_DEVICES": ""}, counted(0)) == [
        WorkerDevice("cpu")]


def test_auto_and_indices_give_a_worker_per_visible_device() -> None:
    assert plan_workers("auto", {}, counted(2)) == [WorkerDevice("cuda:0"),
                                                    WorkerDevice("cuda:1")]
    # indices in CUDA_VISIBLE_DEVICES are counted (by torch, in a child) like no variable
    assert plan_workers((1,), {"CUDA_VISIBLE_DEVICES": "2,3"}, counted(2)) == [
        WorkerDevice("cuda:1")]


def test_each_mig_slice_gets_a_worker_that_sees_only_it() -> None:
    environ = {"CUDA_VISIBLE_DEVICES": ",".join(MIG)}
    assert plan_workers("auto", environ, no_count) == [
        WorkerDevice("cuda:0", {"CUDA_VISIBLE_DEVICES": uuid}) for uuid in MIG]
    assert plan_workers((1,), environ, no_count) == [
        WorkerDevice("cuda:0", {"CUDA_VISIBLE_DEVICES": MIG[1]})]


def test_a_device_that_is_not_visible_is_refused_naming_what_is() -> None:
    with pytest.raises(ValueError, match=r"^cuda:2 not visible here \(visible CUDA devices: "
                                         r"cuda:0 to cuda:1; CUDA_VISIBLE_DEVICES=\(unset\)"):
        plan_workers((0, 2), {}, counted(2))
    with pytest.raises(ValueError, match=r"visible CUDA devices: none"):
        plan_workers((0,), {}, counted(0))
    with pytest.raises(ValueError, match=f"cuda:2 not visible.*{MIG[1]}"):
        plan_workers((2,), {"CUDA_VISIBLE_DEVICES": ",".join(MIG)}, no_count)


def test_serve_starts_a_worker_per_planned_device_with_its_variables() -> None:
    policy = load_policy(POLICIES / "sim_serve.yaml")
    planned = [WorkerDevice("cuda:0", {"CUDA_VISIBLE_DEVICES": m}) for m in MIG]
    commands = child_commands(policy, planned)
    local = [c for c in commands if c.args[:2] == ["worker", "--device"]]
    assert [(c.args, dict(c.environ)) for c in local] == [
        (["worker", "--device", "cuda:0"], {"CUDA_VISIBLE_DEVICES": m}) for m in MIG]
    assert all(not c.environ for c in commands if c not in local)
    assert ["worker", "--engines", "sim-draft", "--device", "sim"] in [
        c.args for c in commands]


def test_without_an_nvidia_device_node_nothing_is_asked(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(devices, "DRIVER_NODES", (tmp_path / "nvidiactl",))
    monkeypatch.setattr(devices.subprocess, "run", lambda *a, **k: no_count())
    assert count_cuda_devices() == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_count_is_torch_s_in_a_child() -> None:
    assert count_cuda_devices() == torch.cuda.device_count()


@pytest.mark.parametrize(("devices_option", "message"), [
    ("cuda:x", "'cuda:x' is not a device"), ("gpu", "'gpu' is not a device"),
    ("cuda:1,cuda:1", "cuda:1 is given twice"), ("cuda:4096", "cuda:4096 not visible here"),
])
def test_serve_exits_2_naming_devices_before_it_starts_anything(
        tmp_path: Path, devices_option: str, message: str) -> None:
    result = CliRunner().invoke(app, ["serve", "--devices", devices_option],
                                env={"LANEWAY_HOME": str(tmp_path)})
    assert result.exit_code == 2, result.output
    assert result.output.startswith(f"laneway serve: --devices: {message}"), result.output
    assert list(tmp_path.iterdir()) == []  # no bundled server, no state
