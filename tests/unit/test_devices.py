"""The accelerator probe against recorded host facts, and once against this machine."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

import hostgpu
from hostgpu import devices
from hostgpu.cli.doctor import doctor
from hostgpu.devices import (
    GpuFacts,
    HostFacts,
    Report,
    TorchFacts,
    probe,
    require,
    usable_devices,
)
from hostgpu.errors import ConfigError, DeviceUnavailable

GiB = 2**30


def FakeTorch(
    *,
    version: str = "2.13.0",
    cuda_version: str | None = None,
    mps_built: bool = False,
    mps_available: bool = False,
    gpus: list[tuple[str, int, int, int]] | None = None,
    recommended_max_memory: int | None = None,
) -> TorchFacts:
    """What an installed torch would report (the probe reads torch into these facts)."""
    return TorchFacts(
        version=version,
        cuda_version=cuda_version,
        mps_built=mps_built,
        mps_available=mps_available,
        mps_recommended_memory=recommended_max_memory if mps_available else None,
        cuda_available=bool(gpus),
        gpus=tuple(GpuFacts(n, m, a, b) for n, m, a, b in gpus or []),
    )


def mac(**overrides: Any) -> HostFacts:
    """Native macOS 14.5 on an M2 Pro with torch whose MPS works."""
    facts = HostFacts(
        system="Darwin",
        machine="arm64",
        kernel_release="23.5.0",
        mac_version="14.5",
        python="3.12.4",
        cpu_count=12,
        ram_bytes=32 * GiB,
        cpu_model="Apple M2 Pro",
        torch=FakeTorch(mps_built=True, mps_available=True, recommended_max_memory=21 * GiB),
    )
    return replace(facts, **overrides)


def linux(**overrides: Any) -> HostFacts:
    """A bare Linux x86_64 box with no NVIDIA driver and no torch."""
    facts = HostFacts(
        system="Linux",
        machine="x86_64",
        kernel_release="6.8.0-45-generic",
        os_release="Ubuntu 24.04.1 LTS",
        python="3.12.3",
        cgroup="0::/init.scope\n",
        mounts="/dev/nvme0n1p2 / ext4 rw,relatime 0 0\n",
        cpu_count=16,
        ram_bytes=64 * GiB,
        cpu_model="AMD Ryzen 9 7950X 16-Core Processor",
    )
    return replace(facts, **overrides)


def docker_desktop_mac(**overrides: Any) -> HostFacts:
    """A container in Docker Desktop's VM on an M-series Mac (recorded values)."""
    facts = HostFacts(
        system="Linux",
        machine="aarch64",
        kernel_release="6.10.14-linuxkit",
        os_release="Debian GNU/Linux 12 (bookworm)",
        python="3.11.9",
        dockerenv=True,
        cgroup="0::/\n",
        mounts=(
            "overlay / overlay rw,relatime,lowerdir=/var/lib/docker/overlay2/l/X,"
            "upperdir=/var/lib/docker/overlay2/abc/diff 0 0\n"
            "/run/host_mark/Users /src fakeowner rw,nosuid 0 0\n"
        ),
        cpu_count=8,
        ram_bytes=8 * GiB,
        torch=FakeTorch(version="2.13.0+cpu"),
    )
    return replace(facts, **overrides)


def missing(report: Report, kind: str) -> devices.Missing:
    found = report.missing_for(kind)
    assert found is not None, f"{kind} should be reported missing: {report.missing}"
    return found


def kinds(report: Report) -> list[str]:
    return [d.kind for d in report.devices]


# --------------------------------------------------------------------------- recorded hosts


def test_docker_desktop_on_a_mac_has_no_accelerator_and_says_run_natively() -> None:
    report = probe(facts=docker_desktop_mac())

    assert report.container == "docker"
    assert report.vm_on_macos is True
    assert kinds(report) == ["cpu"]
    for kind in ("mps", "cuda", "mlx"):
        why = missing(report, kind)
        assert "Docker Desktop's Linux VM on macOS" in why.reason
        assert "6.10.14-linuxkit" in why.reason
        assert "`hostgpu worker` natively" in why.fix
    assert "Metal is unreachable from containers" in missing(report, "mps").reason
    assert not require(report, "mps")
    assert not require(report, "gpu")


def test_orbstack_kernel_is_a_macos_vm_even_without_container_markers() -> None:
    report = probe(
        facts=docker_desktop_mac(
            kernel_release="6.9.7-orbstack-00170-g7b4100b7ced4", dockerenv=False, mounts=""
        )
    )
    assert report.vm_on_macos is True
    assert report.container == "container"
    assert "OrbStack's Linux VM on macOS" in missing(report, "mps").reason


def test_native_macos_14_arm64_with_mps_gives_an_mps_device() -> None:
    report = probe(facts=mac())

    assert kinds(report) == ["mps", "cpu"]
    mps = report.devices[0]
    assert mps.name == "Apple M2 Pro GPU (Metal)"
    assert mps.memory_bytes == 21 * GiB
    assert mps.torch_device == "mps"
    assert report.torch_mps_built is True and report.torch_mps_available is True
    assert report.container is None and report.vm_on_macos is False
    assert report.os == "Darwin" and report.os_version == "14.5"
    assert require(report, "mps") and require(report, "gpu") and not require(report, "cuda")
    assert "macOS has no CUDA" in missing(report, "cuda").reason
    assert missing(report, "mlx").reason == "mlx is not installed"
    cpu = report.devices[-1]
    assert cpu.name == "Apple M2 Pro" and cpu.memory_bytes == 32 * GiB


def test_mps_memory_falls_back_to_ram_without_recommended_max_memory() -> None:
    report = probe(facts=mac(torch=FakeTorch(mps_built=True, mps_available=True)))
    assert report.devices[0].memory_bytes == 32 * GiB


def test_mlx_with_metal_is_a_device_after_mps() -> None:
    report = probe(facts=mac(mlx_version="0.25.2", mlx_metal=True, mlx_device_name="applegpu_g14s"))
    assert kinds(report) == ["mps", "mlx", "cpu"]
    assert report.devices[1].name == "applegpu_g14s"
    assert report.mlx_version == "0.25.2"


def test_macos_12_1_is_too_old_for_mps() -> None:
    report = probe(facts=mac(mac_version="12.1", torch=FakeTorch(mps_built=True)))
    why = missing(report, "mps")
    assert "macOS 12.1" in why.reason and "12.3" in why.reason
    assert "14" in why.fix
    assert kinds(report) == ["cpu"]


def test_torch_built_without_mps() -> None:
    report = probe(facts=mac(torch=FakeTorch(version="2.13.0", mps_built=False)))
    why = missing(report, "mps")
    assert why.reason == "torch 2.13.0 was built without MPS"
    assert "torch==2.13.0" in why.fix
    assert report.torch_mps_built is False


def test_intel_mac_and_rosetta_are_explained() -> None:
    intel = probe(
        facts=mac(
            machine="x86_64",
            cpu_model="Intel(R) Core(TM) i9-9980HK",
            torch=FakeTorch(version="2.2.2", mps_built=True),
        )
    )
    assert "Intel Mac" in missing(intel, "mps").reason
    assert "Apple silicon" in missing(intel, "mlx").reason

    rosetta = probe(facts=mac(machine="x86_64", rosetta=True, torch=FakeTorch()))
    assert "Rosetta" in missing(rosetta, "mps").reason
    assert "arm64 Python" in missing(rosetta, "mps").fix


def test_not_macos_means_no_mps_or_mlx() -> None:
    report = probe(facts=linux())
    assert "MPS exists only on Apple silicon Macs" in missing(report, "mps").reason
    assert "MLX exists only on Apple silicon Macs" in missing(report, "mlx").reason


def test_linux_with_two_cuda_devices() -> None:
    torch = FakeTorch(
        version="2.13.0+cu128",
        cuda_version="12.8",
        gpus=[
            ("NVIDIA A100-SXM4-80GB", 80 * GiB, 8, 0),
            ("NVIDIA GeForce RTX 4090", 24 * GiB, 8, 9),
        ],
    )
    report = probe(facts=linux(nvidia_driver="NVRM version: 570.86.15", torch=torch))

    assert kinds(report) == ["cuda", "cuda", "cpu"]
    a100, rtx, cpu = report.devices
    assert (a100.index, a100.name, a100.memory_bytes, a100.compute_capability) == (
        0,
        "NVIDIA A100-SXM4-80GB",
        80 * GiB,
        "8.0",
    )
    assert (rtx.index, rtx.compute_capability, rtx.torch_device) == (1, "8.9", "cuda:1")
    assert cpu.name == "AMD Ryzen 9 7950X 16-Core Processor"
    assert report.torch_cuda_available is True
    assert report.missing_for("cuda") is None
    assert require(report, "cuda") and require(report, "gpu") and not require(report, "mps")
    assert usable_devices(report=report, device="auto")[0] == a100


def test_linux_cpu_only_torch_build() -> None:
    report = probe(
        facts=linux(nvidia_driver="NVRM version: 570.86.15", torch=FakeTorch(version="2.13.0+cpu"))
    )
    why = missing(report, "cuda")
    assert why.reason == "torch 2.13.0+cpu is a CPU-only build (torch.version.cuda is None)"
    assert "download.pytorch.org/whl/cu" in why.fix
    assert kinds(report) == ["cpu"]


def test_linux_without_nvidia_driver() -> None:
    report = probe(facts=linux(torch=FakeTorch(version="2.13.0+cu128", cuda_version="12.8")))
    why = missing(report, "cuda")
    assert "no NVIDIA driver" in why.reason and "/proc/driver/nvidia/version" in why.reason
    assert "nvidia-smi" in why.fix


def test_driver_present_but_torch_cannot_use_it() -> None:
    torch = FakeTorch(version="2.13.0+cu128", cuda_version="12.8")
    report = probe(facts=linux(nvidia_driver="NVRM version: 470.82.01", torch=torch))
    why = missing(report, "cuda")
    assert "torch.cuda.is_available() is False" in why.reason
    assert "470.82.01" in why.reason and "CUDA 12.8" in why.fix


def test_no_torch_at_all() -> None:
    report = probe(facts=linux(nvidia_driver="NVRM version: 570.86.15", torch=None))
    assert report.torch_version is None
    assert report.torch_cuda_available is None and report.torch_mps_built is None
    assert missing(report, "cuda").reason == "torch is not installed"
    assert missing(report, "cuda").fix == "pip install 'hostgpu[ml]'"
    mac_report = probe(facts=mac(torch=None))
    assert missing(mac_report, "mps").fix == "pip install 'hostgpu[ml]'"
    assert kinds(mac_report) == ["cpu"]


def test_broken_torch_install_is_explained() -> None:
    report = probe(facts=mac(torch=None, torch_error="OSError: libc10.dylib not found"))
    assert "fails to import" in missing(report, "mps").reason
    assert "libc10.dylib" in missing(report, "mps").reason


def test_podman_container_without_gpu() -> None:
    report = probe(facts=linux(containerenv=True, torch=FakeTorch(cuda_version="12.8")))
    assert report.container == "podman"
    assert report.vm_on_macos is False
    why = missing(report, "cuda")
    assert why.reason == "no GPU device was passed into this podman container"
    assert "--gpus all" in why.fix and "natively" in why.fix
    assert "no podman container can reach Metal" in missing(report, "mps").reason


def test_cgroup_v1_docker_hint() -> None:
    cgroup = (
        "12:memory:/docker/4f2a1c9e8b7d6a5f4e3d2c1b0a9f8e7d6c5b4a3f2e1d0c9b8a7f6e5d4c3b2a1f\n"
        "1:name=systemd:/docker/4f2a1c9e8b7d6a5f4e3d2c1b0a9f8e7d6c5b4a3f2e1d0c9b8a7f6e5d4c3b2a1f\n"
    )
    report = probe(facts=linux(cgroup=cgroup))
    assert report.container == "docker"
    assert "docker container" in missing(report, "cuda").reason


@pytest.mark.parametrize(
    ("cgroup", "mounts", "expected"),
    [
        ("0::/kubepods/besteffort/pod1/abc\n", "", "kubernetes"),
        ("0::/system.slice/containerd.service\n", "", "containerd"),
        (
            "0::/\n",
            "overlay / overlay rw,upperdir=/var/lib/containerd/io.containerd.snapshotter/1 0 0\n",
            "containerd",
        ),
        ("0::/init.scope\n", "/dev/sda1 / ext4 rw 0 0\n", None),
    ],
)
def test_container_hints(cgroup: str, mounts: str, expected: str | None) -> None:
    assert devices.detect_container(linux(cgroup=cgroup, mounts=mounts)) == expected


def test_assume_container_override_for_stock_kernels() -> None:
    # Colima and Podman machines run stock kernels: HOSTGPU_ASSUME_CONTAINER=1 tells the probe.
    report = probe(facts=linux(assume_container=True))
    assert report.container == "container"
    assert "passed into this container" in missing(report, "cuda").reason


def test_gather_reads_container_markers_under_root(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / ".containerenv").write_text('engine="podman-5.0"\n')
    (tmp_path / "proc" / "1").mkdir(parents=True)
    (tmp_path / "proc" / "1" / "cgroup").write_text("0::/\n")
    (tmp_path / "proc" / "mounts").write_text("overlay / overlay rw 0 0\n")
    (tmp_path / "proc" / "driver" / "nvidia").mkdir(parents=True)
    (tmp_path / "proc" / "driver" / "nvidia" / "version").write_text(
        "NVRM version: NVIDIA UNIX x86_64 Kernel Module  570.86.15\nGCC version: 12\n"
    )
    facts = HostFacts.gather(root=tmp_path)
    assert facts.containerenv is True and facts.dockerenv is False
    assert facts.cgroup == "0::/\n"
    assert facts.mounts.startswith("overlay / overlay")
    assert facts.nvidia_driver == "NVRM version: NVIDIA UNIX x86_64 Kernel Module  570.86.15"
    assert devices.detect_container(facts) == "podman"


# --------------------------------------------------------------------------- DEVICE setting


def test_device_setting_restricts_and_never_falls_back() -> None:
    cuda_box = probe(
        facts=linux(
            nvidia_driver="NVRM",
            torch=FakeTorch(cuda_version="12.8", gpus=[("NVIDIA L4", 24 * GiB, 8, 9)]),
        )
    )
    assert [d.kind for d in usable_devices(report=cuda_box, device="cpu")] == ["cpu"]
    assert [d.kind for d in usable_devices(report=cuda_box, device="cuda")] == ["cuda", "cpu"]
    assert devices.best_device(report=cuda_box, device="cpu").kind == "cpu"

    with pytest.raises(DeviceUnavailable) as raised:
        usable_devices(report=probe(facts=docker_desktop_mac()), device="mps")
    assert "Metal is unreachable from containers" in str(raised.value)
    assert "`hostgpu worker` natively" in str(raised.value)

    with pytest.raises(ConfigError):
        usable_devices(report=cuda_box, device="tpu")


def test_device_env_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    report = probe(facts=mac())
    monkeypatch.setenv("DEVICE", "cpu")
    assert devices.best_device(report=report).kind == "cpu"
    monkeypatch.setenv("DEVICE", "auto")
    assert devices.best_device(report=report).kind == "mps"
    monkeypatch.setenv("DEVICE", "cuda")
    with pytest.raises(DeviceUnavailable, match="macOS has no CUDA"):
        devices.best_device(report=report)


def test_device_outside_a_job_follows_the_device_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    """`hostgpu.device()` outside a job reads DEVICE as the worker does (either name), and a
    device the host lacks is an error with the reason, not a string torch fails on later."""
    # The module, not the function that hostgpu.devices re-exports under the same name.
    probe_module = importlib.import_module("hostgpu.devices.probe")
    monkeypatch.setattr(probe_module, "host_report", lambda: probe(facts=mac()))
    for name in ("DEVICE", "HOSTGPU_DEVICE", "HOSTGPU_JOB_DEVICE"):
        monkeypatch.delenv(name, raising=False)
    assert hostgpu.device() == "mps"
    monkeypatch.setenv("HOSTGPU_DEVICE", "cpu")
    assert hostgpu.device() == "cpu"
    monkeypatch.setenv("DEVICE", "cuda")
    with pytest.raises(DeviceUnavailable, match="macOS has no CUDA"):
        hostgpu.device()


def test_require_rejects_unknown_values() -> None:
    with pytest.raises(ValueError, match="unknown requirement"):
        require(probe(facts=mac()), "tpu")


# --------------------------------------------------------------------------- CLI


@pytest.fixture
def cli() -> typer.Typer:
    app = typer.Typer()
    app.command()(doctor)
    return app


def use_facts(monkeypatch: pytest.MonkeyPatch, facts: HostFacts) -> None:
    """Through the one seam every process uses: a recorded facts file in HOSTGPU_PROBE_FACTS."""
    fd, name = tempfile.mkstemp(suffix=".json")
    with os.fdopen(fd, "w") as handle:
        handle.write(facts.to_json())
    monkeypatch.setenv("HOSTGPU_PROBE_FACTS", name)


def test_cli_require_mps_fails_in_docker_desktop(
    cli: typer.Typer, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_facts(monkeypatch, docker_desktop_mac())
    result = CliRunner().invoke(cli, ["--require", "mps"])
    assert result.exit_code == 1, result.output
    assert "--require mps" in result.stderr
    assert "Metal is unreachable from containers" in result.stderr
    assert "`hostgpu worker` natively" in result.stderr


def test_cli_require_met_exits_zero(cli: typer.Typer, monkeypatch: pytest.MonkeyPatch) -> None:
    use_facts(monkeypatch, mac())
    for what in ("mps", "gpu"):
        result = CliRunner().invoke(cli, ["--require", what])
        assert result.exit_code == 0, result.output
    assert "Apple M2 Pro GPU (Metal)" in result.stdout
    assert "macOS has no CUDA" in result.stdout
    assert CliRunner().invoke(cli, ["--require", "cuda"]).exit_code == 1


def test_cli_unknown_require_value_exits_2(
    cli: typer.Typer, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_facts(monkeypatch, mac())
    result = CliRunner().invoke(cli, ["--require", "tpu"])
    assert result.exit_code == 2
    assert "unknown --require value 'tpu'" in result.stderr


def test_cli_json_output(cli: typer.Typer, monkeypatch: pytest.MonkeyPatch) -> None:
    torch = FakeTorch(
        version="2.13.0+cu128",
        cuda_version="12.8",
        gpus=[("NVIDIA H100 80GB HBM3", 80 * GiB, 9, 0)],
    )
    use_facts(monkeypatch, linux(nvidia_driver="NVRM", torch=torch))
    result = CliRunner().invoke(cli, ["--json", "--require", "cuda"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert Report.model_validate(data).devices[0].name == "NVIDIA H100 80GB HBM3"
    assert data["devices"][0]["compute_capability"] == "9.0"
    assert data["devices"][-1]["kind"] == "cpu"
    assert {m["kind"] for m in data["missing"]} == {"mps", "mlx"}
    assert data["torch_version"] == "2.13.0+cu128"
    assert data["smoke"] is None


def test_cli_human_output_shows_container_findings(
    cli: typer.Typer, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_facts(monkeypatch, docker_desktop_mac())
    result = CliRunner().invoke(cli, [])
    assert result.exit_code == 0, result.output
    out = " ".join(result.stdout.split())
    assert "Linux VM on macOS" in out
    assert "fix: run `hostgpu worker` natively on the Mac" in out


# --------------------------------------------------------------------------- smoke test


def test_smoke_test_without_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("hostgpu.devices.smoke.import_torch", lambda: (None, None))
    result = devices.smoke_test(probe(facts=linux()).devices)
    assert result == [
        {
            "device": None,
            "ok": False,
            "error": "torch is not installed: pip install 'hostgpu[ml]'",
        }
    ]


# --------------------------------------------------------------------------- desktop VMs


def test_linuxkit_without_mac_evidence_is_not_called_a_mac() -> None:
    """Docker Desktop runs linuxkit on Windows and Linux too: only mounts make it a Mac."""
    facts = docker_desktop_mac(mounts="overlay / overlay rw,upperdir=/var/lib/docker/x 0 0\n")
    report = probe(facts=facts)
    assert report.vm == "Docker Desktop" and report.vm_host == "unknown"
    assert report.vm_on_macos is False
    why = missing(report, "mps")
    assert "on macOS" not in why.reason
    assert why.fix.startswith("if the host is a Mac")


def test_docker_desktop_on_windows_keeps_cuda_explained_by_the_driver() -> None:
    facts = docker_desktop_mac(
        machine="x86_64",
        mounts="overlay / overlay rw 0 0\nC:\\ /run/desktop/mnt/host/c 9p rw 0 0\n",
    )
    report = probe(facts=facts)
    assert report.vm == "Docker Desktop" and report.vm_host == "windows"
    assert report.vm_on_macos is False
    assert "--gpus all" in missing(report, "cuda").fix
    assert "Windows" in missing(report, "mps").fix


def test_colima_on_a_mac_is_recognised_from_its_mounts() -> None:
    facts = docker_desktop_mac(
        kernel_release="6.8.0-50-generic",
        mounts="overlay / overlay rw 0 0\nmount0 /Users/ada/src virtiofs rw 0 0\n"
        "/dev/vdb /mnt/lima-cidata iso9660 ro 0 0\n",
    )
    report = probe(facts=facts)
    assert report.vm == "Colima/Lima" and report.vm_on_macos is True
    assert "Metal is unreachable" in missing(report, "mps").reason


def test_mlx_cpu_backend_is_not_an_accelerator() -> None:
    report = probe(
        facts=linux(mlx_version="0.30.0", mlx_metal=False, mlx_default_device="Device(cpu, 0)")
    )
    assert "mlx" not in kinds(report)
    assert "only its CPU backend" in missing(report, "mlx").reason
    assert report.mlx_gpu is False


def test_recorded_facts_seam_reaches_a_real_doctor_process(tmp_path: Path) -> None:
    """HOSTGPU_PROBE_FACTS makes a real process report a recorded Mac (the one seam)."""
    recorded = tmp_path / "mac.json"
    recorded.write_text(mac().to_json())
    env = {**os.environ, "HOSTGPU_PROBE_FACTS": str(recorded)}
    out = subprocess.run(
        [sys.executable, "-m", "hostgpu", "doctor", "--json", "--require", "mps"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    report = Report.model_validate_json(out.stdout)
    assert [d.kind for d in report.devices] == ["mps", "cpu"]
    assert report.recorded_from == str(recorded)
    assert HostFacts.load(recorded).torch == mac().torch


# --------------------------------------------------------------------------- this machine


def test_probe_of_this_machine() -> None:
    """This test host: a small Linux VM (a container) without a GPU, torch 2.13.0+cpu."""
    pytest.importorskip("torch")
    report = probe()
    assert report.os == "Linux"
    assert report.cpu_cores >= 1 and report.ram_bytes > 0
    assert report.devices[-1].kind == "cpu"
    assert report.devices[-1].memory_bytes == report.ram_bytes
    assert report.torch_version is not None and report.torch_version.startswith("2.")
    cuda = missing(report, "cuda")
    assert cuda.reason and cuda.fix and "\n" not in cuda.reason
    assert "MPS exists only on Apple silicon Macs" in missing(report, "mps").reason
    assert devices.best_device(report=report, device="auto").kind == "cpu"
    assert not require(report, "gpu")

    smoke = devices.smoke_test(report.devices, size=128, repeat=3)
    cpu = next(e for e in smoke if e["kind"] == "cpu")
    assert cpu["ok"] is True and cpu["gflops"] > 0 and cpu["vs_cpu"] == 1.0
