"""The CPU buffer cache (maskops.memory, csrc/common/cpu_allocator.h): reused memory never
leaks stale values into results, cached tensors behave as ordinary tensors, the limit and
empty_cache() work, and concurrent use is safe."""

import os
import pickle
import subprocess
import sys
import threading

import pytest
import torch
from torchvision.models.detection.roi_heads import paste_masks_in_image as tv_paste

import maskops

SANITIZED = maskops.cpu_cache_info()["bypassed"]  # ASan builds bypass the cache


def _paste_case(g, n, image=(400, 500), side=150.0):
    masks = torch.rand(n, 1, 28, 28, generator=g)
    xy = torch.rand(n, 2, generator=g) * torch.tensor([image[1] - 10.0, image[0] - 10.0])
    boxes = torch.cat([xy, xy + torch.rand(n, 2, generator=g) * side + 2], dim=1)
    return masks, boxes


@pytest.mark.skipif(SANITIZED, reason="the cache is bypassed under AddressSanitizer")
def test_freed_output_is_kept_and_reused():
    maskops.empty_cache()
    before = maskops.cpu_cache_info()
    g = torch.Generator().manual_seed(0)
    masks, boxes = _paste_case(g, 8)
    out = maskops.paste_masks(masks, boxes, (1000, 1000))  # 8 MB of bool
    assert maskops.cpu_cache_info()["kept_bytes"] == 0
    nbytes = out.numel()
    del out
    info = maskops.cpu_cache_info()
    assert info["kept_bytes"] >= nbytes
    out = maskops.paste_masks(masks, boxes, (1000, 1000))
    after = maskops.cpu_cache_info()
    assert after["hits"] == info["hits"] + 1 and after["misses"] == info["misses"]
    assert after["misses"] >= before["misses"] + 1
    del out
    released = maskops.empty_cache()
    assert released >= nbytes and maskops.cpu_cache_info()["kept_bytes"] == 0


def test_reused_memory_never_shows_in_results():
    """Fill the cache with ones (full-image boxes of all-one masks), then paste small boxes
    and pool RoIs into memory that held them: results equal the references."""
    g = torch.Generator().manual_seed(1)
    image = (600, 700)
    ones = maskops.paste_masks(
        torch.ones(6, 1, 28, 28), torch.tensor([[0.0, 0, 700, 600]] * 6), image, threshold=None
    )
    assert bool((ones > 0.2).all())  # (padding fades the edges)
    del ones
    masks, boxes = _paste_case(g, 6, image, side=40.0)
    got = maskops.paste_masks(masks, boxes, image, threshold=None)
    torch.testing.assert_close(got, tv_paste(masks, boxes, image), atol=1e-5, rtol=0)
    del got
    got = maskops.paste_masks(masks, boxes, image, threshold=0.5)
    assert torch.equal(got, tv_paste(masks, boxes, image) >= 0.5)
    del got
    # RoIAlign's output and backward workspaces come from the same cache.
    x = torch.randn(1, 64, 100, 100, generator=g, requires_grad=True)
    rois = torch.tensor([[0, 10.0, 10.0, 300.0, 200.0], [0, 50.0, 60.0, 70.0, 90.0]] * 50)
    for _ in range(2):
        out = maskops.roi_align(x, rois, 14, 0.25, 2, True)
        ref = torch.ops.torchvision.roi_align(x, rois, 0.25, 14, 14, 2, True)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        (gx,) = torch.autograd.grad(out.sum(), x)
        (gref,) = torch.autograd.grad(ref.sum(), x)
        torch.testing.assert_close(gx, gref, atol=1e-4, rtol=1e-4)
        del out, gx


def test_cached_tensors_behave_as_ordinary_tensors(tmp_path):
    g = torch.Generator().manual_seed(2)
    masks, boxes = _paste_case(g, 5)
    out = maskops.paste_masks(masks, boxes, (700, 800), threshold=None)  # 11 MB
    ref = out.clone()
    # resize keeps the values (the storage grows through the same allocator)
    out.resize_(6, 1, 700, 800)
    assert torch.equal(out[:5], ref)
    out = out[:5].clone()
    # pickling, torch.save and shared memory (as a DataLoader worker would use it)
    assert torch.equal(pickle.loads(pickle.dumps(out)), ref)
    torch.save(out, tmp_path / "m.pt")
    assert torch.equal(torch.load(tmp_path / "m.pt"), ref)
    shared = maskops.paste_masks(masks, boxes, (700, 800), threshold=None).share_memory_()
    assert shared.is_shared() and torch.equal(shared, ref)
    # numpy views keep the memory alive after the tensor is gone
    arr = maskops.paste_masks(masks, boxes, (700, 800), threshold=None).numpy()
    maskops.paste_masks(masks, boxes, (700, 800), threshold=None).fill_(5)
    assert torch.equal(torch.from_numpy(arr), ref)


def test_concurrent_calls_and_frees():
    g = torch.Generator().manual_seed(3)
    cases = [_paste_case(g, 10) for _ in range(4)]
    expected = [tv_paste(m, b, (500, 600)) >= 0.5 for m, b in cases]
    errors = []

    def work(i):
        try:
            for _ in range(10):
                out = maskops.paste_masks(*cases[i], (500, 600))
                if not torch.equal(out, expected[i]):
                    errors.append(i)
                del out
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def _run(code, **env):
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=120,
    )


PASTE_TWICE = """
import torch, maskops
m = torch.rand(4, 1, 28, 28); b = torch.tensor([[10., 10., 300., 300.]] * 4)
for _ in range(2):
    out = maskops.paste_masks(m, b, (1000, 1000)); del out
print(maskops.cpu_cache_info())
"""


@pytest.mark.skipif(SANITIZED, reason="the cache is bypassed under AddressSanitizer")
def test_limit_from_environment():
    r = _run(PASTE_TWICE, MASKOPS_CPU_CACHE_MB="0")
    assert r.returncode == 0, r.stderr
    info = eval(r.stdout.strip().splitlines()[-1])
    assert info == {"kept_bytes": 0, "limit_bytes": 0, "hits": 0, "misses": 2, "bypassed": False}
    r = _run(PASTE_TWICE, MASKOPS_CPU_CACHE_MB="3")  # one 4 MB block does not fit
    info = eval(r.stdout.strip().splitlines()[-1])
    assert info["kept_bytes"] == 0 and info["limit_bytes"] == 3 << 20


@pytest.mark.skipif(SANITIZED, reason="the cache is bypassed under AddressSanitizer")
@pytest.mark.parametrize("value", ["lots", "-5", "99999999999999999999"])
def test_bad_limit_warns_and_keeps_the_default(value):
    r = _run(PASTE_TWICE, MASKOPS_CPU_CACHE_MB=value)
    assert r.returncode == 0, r.stderr
    assert "MASKOPS_CPU_CACHE_MB" in r.stderr and "non-negative integer" in r.stderr
    info = eval(r.stdout.strip().splitlines()[-1])
    assert info["limit_bytes"] == 1024 << 20 and info["hits"] == 1


FORKED = """
import os, torch, maskops
m = torch.rand(4, 1, 28, 28); b = torch.tensor([[10., 10., 300., 300.]] * 4)
expected = maskops.paste_masks(m, b, (1000, 1000)).clone()
out = maskops.paste_masks(m, b, (1000, 1000)); del out      # one block kept
kept = maskops.cpu_cache_info()["kept_bytes"]
assert kept > 0
pid = os.fork()
if pid == 0:  # the child: nothing kept, and the cache works
    torch.set_num_threads(1)  # as DataLoader workers do: OpenMP does not survive a fork
    ok = maskops.cpu_cache_info()["kept_bytes"] == 0
    ok &= bool(torch.equal(maskops.paste_masks(m, b, (1000, 1000)), expected))
    os._exit(0 if ok else 1)
_, status = os.waitpid(pid, 0)
assert os.waitstatus_to_exitcode(status) == 0, status
assert maskops.cpu_cache_info()["kept_bytes"] == kept    # the parent's is untouched
print("ok")
"""


@pytest.mark.skipif(SANITIZED or not hasattr(os, "fork"), reason="needs fork and the cache")
def test_forked_child_starts_with_an_empty_cache():
    r = _run(FORKED)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


@pytest.mark.skipif(SANITIZED, reason="the cache is bypassed under AddressSanitizer")
def test_a_miss_gives_idle_blocks_back_first_and_a_block_over_the_limit_is_not_kept():
    # New memory is mapped only after the idle kept memory of at least its size went back:
    # what the cache keeps never adds to the process's peak.
    previous = maskops.set_cpu_cache_limit(10 << 20)
    try:
        maskops.empty_cache()
        m = torch.rand(2, 1, 28, 28)
        b = torch.tensor([[1.0, 1, 90, 90]] * 2)
        out = maskops.paste_masks(m, b, (1000, 1000))
        del out  # 2 MB: kept
        assert maskops.cpu_cache_info()["kept_bytes"] > 0
        big = maskops.paste_masks(m, b, (4000, 4000))  # 32 MB: a miss
        assert maskops.cpu_cache_info()["kept_bytes"] == 0
        held = maskops.paste_masks(m, b, (1000, 1000))  # a miss again: nothing kept to reuse
        del big  # over the limit: not kept
        assert maskops.cpu_cache_info()["kept_bytes"] == 0
        del held
        kept = maskops.cpu_cache_info()["kept_bytes"]
        assert 0 < kept <= 4 << 20
        # A hit takes the kept block and gives nothing back.
        again = maskops.paste_masks(m, b, (1000, 1000))
        assert maskops.cpu_cache_info()["kept_bytes"] == 0
        del again
        assert maskops.cpu_cache_info()["kept_bytes"] == kept
    finally:
        maskops.set_cpu_cache_limit(previous)


def test_profiler_sees_cached_memory_and_lazy_clone_works():
    m = torch.rand(5, 1, 28, 28)
    b = torch.tensor([[1.0, 1, 90, 90]] * 5)
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
    ) as prof:
        out = maskops.paste_masks(m, b, (1000, 1000))
    mem = {e.key: e.cpu_memory_usage for e in prof.key_averages()}
    assert mem["maskops::paste_masks"] >= out.numel()
    if hasattr(out, "_lazy_clone"):  # copy-on-write clones need a simple data pointer
        c = out._lazy_clone()
        c[0, 0, 0, 0] = ~c[0, 0, 0, 0]
        assert torch.equal(c[1:], out[1:]) and c[0, 0, 0, 0] != out[0, 0, 0, 0]


@pytest.mark.skipif(SANITIZED, reason="the cache is bypassed under AddressSanitizer")
def test_set_limit_at_run_time():
    out = maskops.paste_masks(
        torch.rand(4, 1, 28, 28), torch.tensor([[1.0, 1, 90, 90]] * 4), (1000, 1000)
    )
    del out
    assert maskops.cpu_cache_info()["kept_bytes"] > 0
    previous = maskops.set_cpu_cache_limit(0)
    try:
        assert maskops.cpu_cache_info()["kept_bytes"] == 0
        out = maskops.paste_masks(
            torch.rand(4, 1, 28, 28), torch.tensor([[1.0, 1, 90, 90]] * 4), (1000, 1000)
        )
        del out
        assert maskops.cpu_cache_info()["kept_bytes"] == 0
    finally:
        assert maskops.set_cpu_cache_limit(previous) == 0
    with pytest.raises(ValueError, match="limit_bytes"):
        maskops.set_cpu_cache_limit(-1)
    with pytest.raises(TypeError, match="limit_bytes"):
        maskops.set_cpu_cache_limit(1.5)


HUGE_PAGES_USED = """
import torch, maskops
out = maskops.paste_masks(torch.rand(4, 1, 28, 28), torch.tensor([[10., 10., 300., 300.]] * 4),
                          (3000, 3000))  # 36 MB: past the huge-page threshold (32 MB)
with open("/proc/self/smaps") as f:
    print(sum(int(l.split()[1]) for l in f if l.startswith("AnonHugePages")))
"""


def _thp_mode():
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return f.read().split("[")[1].split("]")[0]
    except (OSError, IndexError):
        return None


@pytest.mark.skipif(
    SANITIZED or _thp_mode() != "madvise",
    reason="needs the cache and transparent huge pages in madvise mode",
)
def test_huge_pages_and_turning_them_off():
    on = _run(HUGE_PAGES_USED)
    off = _run(HUGE_PAGES_USED, MASKOPS_CPU_HUGE_PAGES="0")
    assert on.returncode == 0 and off.returncode == 0, on.stderr + off.stderr
    kb_on, kb_off = int(on.stdout.split()[-1]), int(off.stdout.split()[-1])
    # In madvise mode only advised memory gets huge pages.
    assert kb_off == 0
    if kb_on == 0:
        pytest.skip("the system had no huge page to give (memory fragmented)")
    assert kb_on >= 2048


# ---- cpu_cache_for_torch: torch's own CPU allocations through the cache ----


def _minor_faults() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _probe_routed() -> bool:
    """Whether a fresh 4 MiB torch.empty is served by the cache right now."""
    before = maskops.cpu_cache_info()
    t = torch.empty(1 << 20)  # 4 MiB
    after = maskops.cpu_cache_info()
    del t
    return after["hits"] + after["misses"] > before["hits"] + before["misses"]


def _allocator() -> dict:
    return maskops.memory._torch_allocator_state()


def _torch_default_in_place() -> bool:
    s = _allocator()
    return s["current"] == s["default"] and s["open"] == 0 and s["depth"] == 0


EVERY_OP_LEAVES_THE_ALLOCATOR = """
import io, torch
import maskops
from maskops import check, memory
def default():
    s = memory._torch_allocator_state()
    return s["current"] == s["default"] and s["route"] == 0
assert default()
# every op with its gradients and test-only twins, as the self-check calls them
report = check.run(quick=True, devices="cpu", out=io.StringIO())
assert report.ok
maskops.set_cpu_cache_limit(maskops.set_cpu_cache_limit(1 << 20))
maskops.cpu_cache_info(); maskops.empty_cache()
print("ok", default())
"""


def test_importing_and_calling_every_op_leaves_torchs_allocator_alone():
    r = _run(EVERY_OP_LEAVES_THE_ALLOCATOR)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split()[-2:] == ["ok", "True"]


@pytest.mark.skipif(SANITIZED, reason="the cache is bypassed under AddressSanitizer")
def test_torchs_allocator_is_replaced_only_while_a_block_is_open():
    assert _torch_default_in_place()
    before = _allocator()["current"]
    with maskops.cpu_cache_for_torch() as routed:
        s = _allocator()
        assert routed and s["current"] == s["route"] != before
        assert s["depth"] == 1 and s["open"] == 1
        with maskops.cpu_cache_for_torch():
            assert _allocator()["depth"] == 2
        assert _allocator()["current"] == s["route"]  # the outer block still routes
    assert _allocator()["current"] == before and _torch_default_in_place()
    with pytest.raises(RuntimeError, match="not routed"):
        torch.ops.maskops._cpu_cache_route_torch(False)  # no block to end
    assert _torch_default_in_place()


def test_off_switch(monkeypatch):
    with maskops.cpu_cache_for_torch(enabled=False) as routed:
        assert not routed and _torch_default_in_place() and not _probe_routed()
    monkeypatch.setenv("MASKOPS_CPU_CACHE_TORCH", "0")
    with maskops.cpu_cache_for_torch() as routed:
        assert not routed and _torch_default_in_place() and not _probe_routed()
    with maskops.cpu_cache_for_torch(enabled=True) as routed:  # the argument wins
        assert routed == (not SANITIZED)
    assert _torch_default_in_place()


@pytest.mark.skipif(SANITIZED, reason="the cache is bypassed under AddressSanitizer")
@pytest.mark.parametrize("switch", [None, "0"])
def test_model_inference_routes_only_during_its_forward(monkeypatch, switch):
    from torch.overrides import TorchFunctionMode

    from models import build_mask_rcnn

    if switch is not None:
        monkeypatch.setenv("MASKOPS_CPU_CACHE_TORCH", switch)
    depths = []

    class Watch(TorchFunctionMode):  # this thread's open blocks at every torch call
        def __torch_function__(self, func, types, args=(), kwargs=None):
            depths.append(_allocator()["depth"])
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    model = build_mask_rcnn("resnet18", num_classes=3, min_size=128, max_size=128).eval()
    image = torch.rand(3, 128, 160)
    with torch.inference_mode():
        for _ in range(2):
            with Watch():
                model([image])
            assert _torch_default_in_place()
    assert max(depths) == (0 if switch == "0" else 1)


@pytest.mark.skipif(SANITIZED, reason="the cache is bypassed under AddressSanitizer")
def test_only_the_threads_inside_a_block_are_routed():
    entered, done = threading.Event(), threading.Event()
    seen = {}

    def inside():
        with maskops.cpu_cache_for_torch():
            seen["inside"] = _probe_routed()
            entered.set()
            done.wait(60)

    t = threading.Thread(target=inside)
    t.start()
    try:
        assert entered.wait(60)
        s = _allocator()
        assert s["current"] == s["route"] and s["open"] == 1 and s["depth"] == 0
        seen["outside"] = _probe_routed()  # this thread: torch's default allocator
    finally:
        done.set()
        t.join()
    assert seen == {"inside": True, "outside": False}
    assert _torch_default_in_place()


@pytest.mark.skipif(SANITIZED, reason="the cache is bypassed under AddressSanitizer")
def test_torch_allocations_routed_only_inside_the_block():
    assert not _probe_routed()
    with maskops.cpu_cache_for_torch() as routed:
        assert routed
        assert _probe_routed()
        small = torch.empty(1000)  # under 1 MiB: torch's default allocator, as before
        assert small.numel() == 1000
    assert not _probe_routed()


@pytest.mark.skipif(SANITIZED, reason="the cache is bypassed under AddressSanitizer")
def test_routing_nests_and_survives_exceptions():
    with maskops.cpu_cache_for_torch():
        with maskops.cpu_cache_for_torch():
            assert _probe_routed()
        assert _probe_routed()  # the outer block still routes
        with pytest.raises(KeyError):
            with maskops.cpu_cache_for_torch():
                raise KeyError("inside")
        assert _probe_routed()
    assert not _probe_routed()


@pytest.mark.skipif(SANITIZED, reason="the cache is bypassed under AddressSanitizer")
def test_routing_from_threads_ends_with_the_last_block():
    barrier = threading.Barrier(4)
    errors = []

    def worker(seed):
        try:
            g = torch.Generator().manual_seed(seed)
            x = torch.rand(64, 128, 128, generator=g)
            with maskops.cpu_cache_for_torch():
                barrier.wait()
                for _ in range(5):
                    y = (x * 2).sum(0)  # 4 MiB temporaries from the cache
                    torch.testing.assert_close(y, x.sum(0) * 2)
                barrier.wait()
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert not _probe_routed()
    assert _torch_default_in_place()


@pytest.mark.skipif(SANITIZED, reason="the cache is bypassed under AddressSanitizer")
def test_tensors_made_inside_outlive_the_block(tmp_path):
    g = torch.Generator().manual_seed(3)
    src = torch.rand(512, 1024, generator=g)
    with maskops.cpu_cache_for_torch():
        t = src * 3  # 2 MiB, from the cache
    assert _torch_default_in_place()
    torch.testing.assert_close(t, src * 3)
    t.resize_(1024, 1024)  # its storage grows through the cache allocator, after the block
    t[512:] = 1.0
    assert t[:512].equal(src * 3) and bool((t[512:] == 1).all())
    assert t.numpy().shape == (1024, 1024)
    torch.save(t, tmp_path / "t.pt")
    assert torch.load(tmp_path / "t.pt").equal(t)
    kept = maskops.cpu_cache_info()["kept_bytes"]
    del t
    assert maskops.cpu_cache_info()["kept_bytes"] >= kept  # freed into the cache


@pytest.mark.skipif(SANITIZED, reason="the cache is bypassed under AddressSanitizer")
@pytest.mark.skipif(
    not (hasattr(torch.ops, "mkldnn") and hasattr(torch.ops.mkldnn, "_convolution_pointwise")),
    reason="needs oneDNN",
)
def test_onednn_ops_inside_match_outside_and_reuse_memory():
    """oneDNN allocates through the raw allocator interface (raw_allocate / raw_deallocate)
    as well: fused convolutions and matmuls inside the block give the same results, and once
    warm, a repeated call maps no new pages."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(1, 64, 160, 160, generator=g).contiguous(memory_format=torch.channels_last)
    w = (torch.randn(128, 64, 3, 3, generator=g) * 0.05).contiguous(
        memory_format=torch.channels_last
    )
    b = torch.randn(128, generator=g)
    a = torch.randn(1500, 1024, generator=g)
    lw = torch.randn(1024, 1024, generator=g) * 0.03

    def call():
        y = torch.ops.mkldnn._convolution_pointwise(
            x, w, b, [1, 1], [1, 1], [1, 1], 1, "relu", [], ""
        )
        z = torch.ops.mkldnn._linear_pointwise(a, lw, None, "relu", [], "")
        return y, z

    with torch.no_grad():
        ref = call()
        with maskops.cpu_cache_for_torch():
            for _ in range(2):  # warm: the blocks are mapped once
                got = call()
            del got
            faults = _minor_faults()
            got = call()
            faults = _minor_faults() - faults
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
    # 13 MB + 6 MB of outputs: ~4,700 pages when faulted in afresh.
    assert faults < 400, faults


ONEDNN_BUFFER_OUTLIVES_BLOCK = """
import torch, maskops
mk = torch.ops.mkldnn
w = torch.randn(2048, 1024, 1, 1)
made_before = mk._reorder_convolution_weight(w, [0, 0], [1, 1], [1, 1], 1, [1, 1024, 50, 50])
with maskops.cpu_cache_for_torch():
    inside = mk._reorder_convolution_weight(w, [0, 0], [1, 1], [1, 1], 1, [1, 1024, 50, 50])
    del made_before  # from torch's default allocator, freed inside the block
    scratch = mk._reorder_convolution_weight(w, [0, 0], [1, 1], [1, 1], 1, [1, 1024, 50, 50])
    kept = maskops.cpu_cache_info()["kept_bytes"]
    del scratch  # from the cache, freed inside the block: kept for the next request
    kept_inside = maskops.cpu_cache_info()["kept_bytes"] > kept
x = torch.randn(1, 1024, 50, 50).contiguous(memory_format=torch.channels_last)
y = mk._convolution_pointwise(x, inside, None, [0, 0], [1, 1], [1, 1], 1, "none", [], "")
ref = torch.nn.functional.conv2d(x, w)
assert torch.allclose(y, ref, atol=1e-3, rtol=1e-4), (y - ref).abs().max()
kept = maskops.cpu_cache_info()["kept_bytes"]
# From the cache, freed after the block through oneDNN's raw_deallocate, i.e. torch's default
# allocator again: the C library, whose kind of memory the cache's blocks are, releases it.
del inside
released = maskops.cpu_cache_info()["kept_bytes"] == kept
s = maskops.memory._torch_allocator_state()
print("ok", kept_inside, released, s["current"] == s["default"])
"""


@pytest.mark.skipif(SANITIZED, reason="the cache is bypassed under AddressSanitizer")
@pytest.mark.skipif(
    not (hasattr(torch.ops, "mkldnn") and hasattr(torch.ops.mkldnn, "_reorder_convolution_weight")),
    reason="needs oneDNN",
)
def test_onednn_buffers_freed_after_the_block_go_back_to_their_owner():
    # oneDNN frees its tensors' memory through torch's CPU allocator of the moment; a buffer
    # taken from the cache inside the block and freed outside it reaches torch's default
    # allocator's free(), which must own it (the cache's blocks come from the C library).
    r = _run(ONEDNN_BUFFER_OUTLIVES_BLOCK)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["ok", "True", "True", "True"]


ONEDNN_ADDRESS_REUSED = """
import torch, maskops
from maskops import memory
mk = torch.ops.mkldnn
w = torch.randn(2048, 1024, 1, 1)
def reorder():
    return mk._reorder_convolution_weight(w, [0, 0], [1, 1], [1, 1], 1, [1, 1024, 50, 50])
for _ in range(4):
    with maskops.cpu_cache_for_torch():
        inside = reorder()          # 8 MiB from the cache (oneDNN's raw_allocate)
    del inside                      # after the block: torch's default allocator frees it
    outside = reorder()             # torch's default allocator, maybe at the same address
    kept = maskops.cpu_cache_info()["kept_bytes"]
    with maskops.cpu_cache_for_torch():
        del outside                 # freed through the routing allocator: not the cache's
        assert maskops.cpu_cache_info()["kept_bytes"] == kept
s = memory._torch_allocator_state()
print("ok", s["current"] == s["default"])
"""


@pytest.mark.skipif(SANITIZED, reason="the cache is bypassed under AddressSanitizer")
@pytest.mark.skipif(
    not (hasattr(torch.ops, "mkldnn") and hasattr(torch.ops.mkldnn, "_reorder_convolution_weight")),
    reason="needs oneDNN",
)
@pytest.mark.parametrize("thp", ["0", "1"])
def test_onednn_buffers_freed_between_blocks_never_enter_the_cache(thp):
    # A cache block that oneDNN frees after the block goes to the C library, which may give
    # its address to torch's default allocator next (2 MiB-aligned, as the cache's blocks,
    # with THP_MEM_ALLOC_ENABLE=1); freed in a later block, that memory is not the cache's.
    r = _run(ONEDNN_ADDRESS_REUSED, THP_MEM_ALLOC_ENABLE=thp)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["ok", "True"]
