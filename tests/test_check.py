"""The installed self-check, `python -m maskops.check`: it passes here, it names a broken op,
its JSON parses, a GPU the build cannot run gets a rebuild message, and an installed wheel
runs it in a fresh environment without this repository."""

import io
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time

import pytest
import torch

import maskops
from maskops import check

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---- the check passes, and fails when a kernel is wrong


def test_quick_check_passes_on_this_machine():
    out = io.StringIO()
    t0 = time.perf_counter()
    report = check.run(quick=True, devices="cpu", out=out)
    text = out.getvalue()
    assert report.ok, text
    assert time.perf_counter() - t0 < 60  # measured ~10 s on 2 loaded cores
    assert report.mode == "quick" and report.devices[0].startswith("cpu")
    assert report.location == os.path.dirname(maskops.__file__)
    assert report.build_info["version"] == maskops.__version__
    checked = {r.op for r in report.results}
    for op in (
        "roi_align",
        "multiscale_roi_align",
        "nms",
        "batched_nms",
        "box_iou",
        "box_area",
        "generate_anchors",
        "encode_boxes",
        "decode_boxes",
        "clip_boxes",
        "remove_small_boxes",
        "rpn_proposals",
        "paste_masks",
        "masks_to_rle",
    ):
        assert op in checked
        assert (
            any(r.op == op and r.check == "opcheck" for r in report.results) or op == "masks_to_rle"
        )
    kinds = {r.check for r in report.results}
    assert {"gradcheck", "opcheck", "backward deterministic: ref, repeat"} <= kinds
    for r in report.results:
        assert r.ok and r.device == "cpu" and r.cases >= 1, r
        if r.max_error is not None and r.tolerance:
            assert r.max_error <= r.tolerance
    assert {"float32", "float64"} <= {r.dtype for r in report.results}
    lines = text.strip().splitlines()
    assert lines[0].startswith("maskops ") and "seed" in lines[0]
    assert lines[-1].startswith("OK: all") and str(len(report.results)) in lines[-1]
    json.dumps(report.to_dict())


def test_a_slightly_wrong_roi_align_fails_and_is_named(monkeypatch, capsys):
    good = maskops.roi_align
    monkeypatch.setattr(maskops, "roi_align", lambda *a, **k: good(*a, **k) * (1 + 1e-3))
    rc = check.main(["--quick", "--device", "cpu", "--ops", "roi_align"])
    out = capsys.readouterr().out
    assert rc == 1
    last = out.strip().splitlines()[-1]
    assert last.startswith("FAILED:") and "roi_align forward vs float64 ref (cpu, float32)" in last
    assert "roi_align backward vs float64 ref (cpu, float64)" in last  # autograd scales it too
    assert "-> " in out and "> tolerance" in out  # the failing comparison is shown


def test_a_wrong_nms_index_fails(monkeypatch):
    good = maskops.nms
    monkeypatch.setattr(maskops, "nms", lambda *a, **k: good(*a, **k)[:-1])
    report = check.run(quick=True, devices="cpu", ops=["nms"], out=io.StringIO())
    assert not report.ok
    failed = {(r.op, r.check) for r in report.failures}
    assert ("nms", "vs greedy float64 ref") in failed and (
        "batched_nms",
        "vs greedy float64 ref",
    ) not in failed
    assert any("elements differ" in r.detail or "shape" in r.detail for r in report.failures)


def test_a_crashing_op_is_a_named_failure(monkeypatch):
    def broken(*a, **k):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(maskops, "paste_masks", broken)
    report = check.run(quick=True, devices="cpu", ops=["paste_masks"], out=io.StringIO())
    assert not report.ok and all(r.op == "paste_masks" for r in report.failures)
    assert "illegal memory access" in report.failures[0].detail


def test_gpu_only_paths_run_on_the_cpu():
    """What runs only on a GPU (comparisons with the CPU kernel, deterministic gradcheck),
    driven on the CPU: the code runs and CPU-vs-CPU agrees."""
    rows = []
    checker = check.Checker(
        torch.device("cpu"), full=False, gen=torch.Generator().manual_seed(5), emit=rows.append
    )
    checker.cuda = True  # as on a GPU; every "CUDA" call lands on the CPU kernels
    for group, (method, _) in check.GROUPS.items():
        if group != "opcheck":
            getattr(checker, method)()
    assert all(r.ok for r in rows), [check.format_row(r) for r in rows if not r.ok]
    vs_cpu = {r.op for r in rows if "CPU kernel" in r.check}
    assert {
        "roi_align",
        "multiscale_roi_align",
        "nms",
        "box_iou",
        "generate_anchors",
        "decode_boxes",
        "clip_boxes",
        "rpn_proposals",
        "paste_masks",
    } <= vs_cpu
    assert any(r.check == "gradcheck deterministic" for r in rows)


# ---- JSON


def test_json_file_and_stdout(tmp_path, capsys):
    path = tmp_path / "check.json"
    assert (
        check.main(
            ["--quick", "--device", "cpu", "--ops", "boxes,rle", "--seed", "7", "--json", str(path)]
        )
        == 0
    )
    data = json.loads(path.read_text())
    assert data["ok"] is True and data["seed"] == 7 and data["failures"] == []
    assert data["build_info"]["has_cuda_kernels"] == maskops.has_cuda()
    row = data["results"][0]
    assert set(row) >= {"op", "device", "dtype", "check", "ok", "max_error", "tolerance", "detail"}
    capsys.readouterr()
    assert check.main(["--quick", "--device", "cpu", "--ops", "rle", "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["results"][0]["op"] == "masks_to_rle"  # stdout: JSON only
    assert "OK: all" in captured.err  # the table went to stderr


def test_bad_arguments():
    assert check.main(["--ops", "no_such_op"]) == 2
    with pytest.raises(ValueError):
        check.run(devices="tpu", out=io.StringIO())


def test_asking_for_an_absent_gpu_fails(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    report = check.run(quick=True, devices="cuda:0", out=io.StringIO())
    assert not report.ok and report.failures[0].op == "device"
    assert "cuda:0 was asked for" in report.failures[0].detail


# ---- GPU architecture


@pytest.mark.parametrize(
    "arch_list,capability,runs",
    [
        ("9.0", (9, 0), True),
        ("9.0", (8, 6), False),
        ("9.0", (10, 0), False),  # machine code does not run on a newer major version
        ("8.0", (8, 6), True),  # ... but on a newer minor one
        ("8.6", (8, 0), False),
        ("8.0+PTX", (12, 0), True),  # PTX is compiled by the driver for newer cards
        ("7.5;8.0 9.0a", (9, 0), True),
        ("9.0a", (9, 1), False),  # arch-specific code runs on exactly that capability
        ("10.0f", (10, 3), True),
        ("Ampere", (8, 9), True),  # 8.0;8.6+PTX
        ("Turing", (7, 0), False),
        ("12.0", (12, 0), True),
        ("", (9, 0), None),
        (None, (9, 0), None),
    ],
)
def test_arch_runs_on(arch_list, capability, runs):
    assert check.arch_runs_on(arch_list, capability) is runs


def _fake_gpu(monkeypatch, capability, arch_list="9.0", kernels=True):
    """One visible 'GPU' (nothing real behind it) and a build with the given arch list."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=None: "Fake GPU")
    info = dict(
        maskops.build_info(), cuda_arch_list=arch_list, with_cuda=kernels, has_cuda_kernels=kernels
    )
    monkeypatch.setattr(maskops, "build_info", lambda: info)
    return info


def test_a_gpu_outside_the_arch_list_gets_a_rebuild_message_before_any_cuda_work(
    monkeypatch, capsys
):
    _fake_gpu(monkeypatch, (8, 6), "9.0")
    rc = check.main(["--quick", "--device", "cuda"])
    out = capsys.readouterr().out
    assert rc == 1
    assert "compute capability 8.6 (sm_86)" in out and 'TORCH_CUDA_ARCH_LIST="9.0"' in out
    assert 'TORCH_CUDA_ARCH_LIST="8.6" pip install --no-build-isolation .' in out
    assert 'TORCH_CUDA_ARCH_LIST="9.0;8.6"' in out
    assert "no kernel image" not in out  # no CUDA call was made: nothing real is there
    assert (
        out.strip().splitlines()[-1]
        == "FAILED: 1 of 1 checks: CUDA kernels run on this GPU (cuda:0, -)"
    )
    # The default (every device) still checks the CPU, and fails because of the GPU.
    report = check.run(quick=True, ops=["rle"], out=io.StringIO())
    assert [r.op for r in report.failures] == ["CUDA kernels"]
    assert any(r.device == "cpu" and r.ok for r in report.results)


def test_arch_problem_found_by_the_probe_and_other_cuda_problems(monkeypatch):
    info = _fake_gpu(monkeypatch, (12, 0), arch_list=None)  # list not recorded: ask the GPU

    def no_image(device):
        raise RuntimeError("CUDA error: no kernel image is available for execution on the device")

    msg = check.cuda_device_problem(0, info, probe=no_image)
    assert "compute capability 12.0" in msg and "was not recorded" in msg
    assert 'TORCH_CUDA_ARCH_LIST="12.0" pip install --no-build-isolation .' in msg
    assert check.cuda_device_problem(0, info, probe=lambda device: None) is None
    msg = check.cuda_device_problem(0, info, probe=lambda device: 1 / 0)
    assert msg.startswith(
        "a first maskops CUDA kernel failed on cuda:0 (Fake GPU): ZeroDivisionError"
    )
    cpu_only = dict(info, has_cuda_kernels=False)
    assert "no CUDA kernels" in check.cuda_device_problem(0, cpu_only, probe=False)


# ---- an installed wheel, in a fresh environment, without this repository


def _sources_copy(dest):
    """What a wheel is built from: setup.py, pyproject.toml, csrc/, maskops/*.py."""
    os.makedirs(dest)
    for name in ("setup.py", "pyproject.toml"):
        shutil.copy2(os.path.join(ROOT, name), dest)
    shutil.copytree(os.path.join(ROOT, "csrc"), os.path.join(dest, "csrc"))
    for folder, _, names in os.walk(os.path.join(ROOT, "maskops")):
        if "__pycache__" in folder:
            continue
        to = os.path.join(dest, os.path.relpath(folder, ROOT))
        os.makedirs(to, exist_ok=True)
        for name in names:
            if name.endswith(".py") and name != "_build_info.py":
                shutil.copy2(os.path.join(folder, name), to)


def _build_env():
    """setup.py's settings that reproduce this build (CUDA or not, its arch list)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MASKOPS_CPU_ONLY")}
    info = maskops.build_info()
    if not info["with_cuda"]:
        env["MASKOPS_CPU_ONLY"] = "1"
    elif info.get("cuda_arch_list"):
        env["TORCH_CUDA_ARCH_LIST"] = info["cuda_arch_list"]
    return env


# setup.py's bdist_wheel with one change: the extension is not compiled but copied from this
# checkout's build of the same sources (torch's BuildExtension always recompiles with ninja).
_BDIST_WITH_BUILT_EXTENSION = textwrap.dedent("""
    import os, runpy, shutil, sys
    import torch.utils.cpp_extension as cpp
    built, dist = sys.argv[1], sys.argv[2]

    def build_extensions(self):
        for ext in self.extensions:
            dest = self.get_ext_fullpath(ext.name)
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            shutil.copyfile(built, dest)

    cpp.BuildExtension.build_extensions = build_extensions
    sys.argv = ["setup.py", "-q", "bdist_wheel", "-d", dist]
    runpy.run_path("setup.py", run_name="__main__")
""")


def _install_and_run(wheel, tmp_path):
    """A fresh venv that reaches torch but not this repository; the wheel installed into it;
    then `python -m maskops.check` run there from a folder outside the repository."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = str(venv / "bin" / "python")
    site = subprocess.run(
        [py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    # torch (and numpy, torchvision) from this environment: a plain path line. .pth files in
    # that folder are not run from there, so its editable-install hook for maskops stays off.
    torch_site = os.path.dirname(os.path.dirname(torch.__file__))
    with open(os.path.join(site, "_torch_from_dev_env.pth"), "w") as f:
        f.write(torch_site + "\n")
    run_dir = tmp_path / "elsewhere"
    run_dir.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONNOUSERSITE="1", OMP_WAIT_POLICY="PASSIVE")
    before = subprocess.run(
        [py, "-c", "import importlib.util as u; print(u.find_spec('maskops'))"],
        cwd=run_dir,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert before.stdout.strip() == "None"  # maskops is not reachable before the install
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            py,
            "install",
            "-q",
            "--no-deps",
            "--no-index",
            "--no-compile",
            str(wheel),
        ],
        check=True,
    )
    out_json = run_dir / "check.json"
    proc = subprocess.run(
        [
            py,
            "-m",
            "maskops.check",
            "--quick",
            "--device",
            "cpu",
            "--ops",
            "roi_align,nms,rle",
            "--json",
            str(out_json),
        ],
        cwd=run_dir,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads(out_json.read_text())
    assert data["ok"] and data["results"]
    assert data["location"].startswith(str(venv)), data["location"]  # the wheel's copy ran
    return data


def test_installed_wheel_runs_the_check_without_the_repository(tmp_path):
    """The wheel is made by setup.py (packages, extension name, ABI tag, build info) from a
    copy of the sources; only the compiler run is replaced by this checkout's compiled
    extension, so this takes ~20 s instead of minutes. The `slow` test below compiles."""
    src = tmp_path / "src"
    _sources_copy(src)
    dist = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-c", _BDIST_WITH_BUILT_EXTENSION, maskops._C.__file__, str(dist)],
        cwd=src,
        env=_build_env(),
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = dist.glob("maskops-*.whl")
    data = _install_and_run(wheel, tmp_path)
    assert data["build_info"]["with_cuda"] == maskops.build_info()["with_cuda"]


@pytest.mark.slow
def test_wheel_compiled_from_scratch_runs_the_check(tmp_path, request):
    """`python -m build --wheel --no-isolation`, CPU kernels only, then as above. Compiling
    takes minutes on 2 cores (~540 s of compiler time): run with `pytest -m slow`."""
    if "slow" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("compiles the extension (minutes): run with -m slow")
    src = tmp_path / "src"
    _sources_copy(src)
    env = dict(_build_env(), MASKOPS_CPU_ONLY="1")
    env.pop("TORCH_CUDA_ARCH_LIST", None)
    env.setdefault("MAX_JOBS", "2")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "build",
            "--wheel",
            "--no-isolation",
            "-o",
            str(tmp_path / "dist"),
            ".",
        ],
        cwd=src,
        env=env,
        check=True,
        capture_output=True,
        timeout=3600,
    )
    (wheel,) = (tmp_path / "dist").glob("maskops-*.whl")
    data = _install_and_run(wheel, tmp_path)
    assert data["build_info"]["with_cuda"] is False
