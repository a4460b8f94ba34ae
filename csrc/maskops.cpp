// The whole maskops operator API in one place: every schema is declared here, once (the
// product's and, in a library of their own at the end, the test-only ops').
//
// The op pattern (see csrc/README.md):
//   - schemas: this file, TORCH_LIBRARY(maskops, m) and TORCH_LIBRARY(maskops_testing, m);
//   - kernels: csrc/<op>/<op>_cpu.cpp and csrc/<op>/<op>_cuda.cu register with
//     TORCH_LIBRARY_IMPL(maskops, CPU / CUDA, m); no device branches inside a kernel;
//   - per-element math: csrc/<op>/<op>.h, HOST_DEVICE, shared by both;
//   - Python front: maskops/<op>.py validates, documents, and registers the fake kernel and
//     autograd formula.
// Ops whose name starts with "_" are private: backward passes and internals. The test-only
// ops (the CUDA algorithms run on the CPU) are a library of their own, at the end.
#include <Python.h>
#include <torch/library.h>

#include "common/cpu_allocator.h"
#include "common/cpu_isa.h"

// The extension is imported as a Python module so that loading it runs the registrations
// below. Its only Python functions tell and set the SIMD level of the CPU kernels
// (common/cpu_isa.h), for maskops.cpu, the one Python module that asks about the CPU.
namespace {

PyObject* isa_name(maskops::CpuIsa isa) { return PyUnicode_FromString(maskops::cpu_isa_name(isa)); }

PyObject* cpu_isa(PyObject*, PyObject*) { return isa_name(maskops::cpu_isa()); }

PyObject* cpu_isa_supported(PyObject*, PyObject*) { return isa_name(maskops::cpu_isa_supported()); }

// set_cpu_isa(name) -> the level now in force (the request clamped to the CPU's).
PyObject* set_cpu_isa(PyObject*, PyObject* arg) {
  const char* name = PyUnicode_Check(arg) ? PyUnicode_AsUTF8AndSize(arg, nullptr) : nullptr;
  maskops::CpuIsa isa;
  if (name == nullptr || !maskops::parse_cpu_isa(name, &isa)) {
    PyErr_Clear();
    PyErr_SetString(PyExc_ValueError, "expected 'avx512', 'avx2' or 'default'");
    return nullptr;
  }
  return isa_name(maskops::set_cpu_isa(isa));
}

PyMethodDef methods[] = {
    {"cpu_isa", cpu_isa, METH_NOARGS, "The SIMD level the CPU kernels dispatch to now."},
    {"cpu_isa_supported", cpu_isa_supported, METH_NOARGS, "The CPU's own SIMD level."},
    {"set_cpu_isa", set_cpu_isa, METH_O, "Caps the kernels' SIMD level; returns the level."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(maskops, m) {
  // ---- RoIAlign (csrc/roi_align) ----
  // rois: [K, 5] (batch_index, x1, y1, x2, y2) in input-image pixels, any floating dtype.
  m.def(
      "roi_align(Tensor input, Tensor rois, float spatial_scale, int pooled_height, "
      "int pooled_width, int sampling_ratio, bool aligned) -> Tensor");
  m.def(
      "_roi_align_backward(Tensor grad, Tensor rois, float spatial_scale, int pooled_height, "
      "int pooled_width, SymInt batch_size, SymInt channels, SymInt height, SymInt width, "
      "int sampling_ratio, bool aligned) -> Tensor");
  // Multi-level (FPN) RoIAlign: each RoI reads the level torchvision's LevelMapper picks,
  // floor(canonical_level + log2(sqrt(area) / canonical_scale) + 1e-6) clamped to
  // [k_min, k_min + levels - 1]; features[i] is pyramid level k_min + i.
  m.def(
      "multiscale_roi_align(Tensor[] features, Tensor rois, float[] spatial_scales, "
      "int pooled_height, int pooled_width, int sampling_ratio, bool aligned, "
      "float canonical_scale, float canonical_level, int k_min) -> Tensor");
  m.def(
      "_multiscale_roi_align_backward(Tensor grad, Tensor rois, float[] spatial_scales, "
      "int pooled_height, int pooled_width, SymInt batch_size, SymInt channels, "
      "SymInt[] heights, SymInt[] widths, int sampling_ratio, bool aligned, "
      "float canonical_scale, float canonical_level, int k_min) -> Tensor[]");

  // ---- Mask paste (csrc/paste_masks) ----
  // masks: [N, C, M, M]; boxes: [N, 4] (x1, y1, x2, y2) pixels; output [N, C, height, width],
  // the masks' dtype, or bool (uint8 with as_uint8) when threshold is given.
  m.def(
      "paste_masks(Tensor masks, Tensor boxes, int height, int width, int padding, "
      "float? threshold, bool as_uint8) -> Tensor");
  // Binary masks [N, H, W] to COCO RLE strings: (concatenated characters, length per mask).
  // A host-side op: its output is for Python, so CUDA inputs are encoded from a CPU copy.
  m.def("_masks_to_rle(Tensor masks) -> (Tensor, Tensor)");

  // ---- NMS and box IoU (csrc/nms) ----
  // boxes: [N, 4] (x1, y1, x2, y2), any floating dtype; scores: [N]; idxs: [N] integer class
  // ids. The NMS ops return the int64 indices of the kept boxes by decreasing score (ties by
  // index); the output length depends on the data.
  m.def(
      "nms(Tensor boxes, Tensor scores, float iou_threshold, float? score_threshold=None, "
      "int? max_output=None) -> Tensor");
  m.def(
      "batched_nms(Tensor boxes, Tensor scores, Tensor idxs, float iou_threshold, "
      "float? score_threshold=None, int? max_output=None) -> Tensor");
  m.def("box_area(Tensor boxes) -> Tensor");
  m.def("box_iou(Tensor boxes1, Tensor boxes2) -> Tensor");

  // ---- Anchors (csrc/anchors) ----
  // Every FPN level's anchors in one launch, torchvision AnchorGenerator's values and order.
  // Level l: grid (grid_sizes[2l], grid_sizes[2l+1]) = (H, W), strides (strides[2l],
  // strides[2l+1]), its sizes_per_level[l] sizes and ratios_per_level[l] aspect ratios
  // (height / width) taken in turn from the flat `sizes` / `aspect_ratios` tensors, which
  // also set the output device. Output: [sum over levels of H * W * sizes * ratios, 4].
  m.def(
      "generate_anchors(Tensor sizes, Tensor aspect_ratios, int[] sizes_per_level, "
      "int[] ratios_per_level, SymInt[] grid_sizes, SymInt[] strides, ScalarType dtype) "
      "-> Tensor");

  // ---- Box coding, clipping, small boxes (csrc/boxes) ----
  // torchvision's BoxCoder arithmetic. weights: (wx, wy, ww, wh), positive. rel_codes [N, 4K]
  // and boxes [N, 4] decode to [N, K, 4] in rel_codes' dtype, dw and dh clamped at `clamp`;
  // reference_boxes and proposals [N, 4] (same dtype) encode to [N, 4].
  m.def("decode_boxes(Tensor rel_codes, Tensor boxes, float[] weights, float clamp) -> Tensor");
  m.def("encode_boxes(Tensor reference_boxes, Tensor proposals, float[] weights) -> Tensor");
  // boxes [..., 4]: x clamped to [0, width], y to [0, height].
  m.def("clip_boxes(Tensor boxes, int height, int width) -> Tensor");
  // boxes [N, 4]: int64 indices of the boxes whose width and height are both >= min_size.
  m.def("remove_small_boxes(Tensor boxes, float min_size) -> Tensor");

  // ---- RPN proposals (csrc/rpn) ----
  // torchvision RegionProposalNetwork's decode + filter_proposals for a batch: objectness
  // [B, A] logits, deltas [B, A, 4], anchors [A, 4] (shared) or [B, A, 4], image_sizes
  // (height, width) per image, flattened; levels split A as num_anchors_per_level. Returns
  // per image the kept boxes [K_b, 4] (deltas' dtype) and scores [K_b] (objectness' dtype),
  // by decreasing score; K_b depends on the data.
  m.def(
      "rpn_proposals(Tensor objectness, Tensor deltas, Tensor anchors, int[] image_sizes, "
      "int pre_nms_top_n, int post_nms_top_n, float nms_thresh, float score_thresh, "
      "float min_size, int[] num_anchors_per_level) -> (Tensor[], Tensor[])");

  // ---- The CPU buffer cache (csrc/common/cpu_allocator.h); no tensors, so one kernel ----
  m.def("_cpu_cache_release() -> int", &maskops::cpu_cache_release);
  m.def("_cpu_cache_stats() -> int[]", &maskops::cpu_cache_stats);
  m.def("_cpu_cache_set_limit(int bytes) -> int", &maskops::cpu_cache_set_limit);
  m.def("_cpu_cache_route_torch(bool on) -> bool", &maskops::cpu_cache_route_torch);
  m.def("_cpu_cache_torch_allocator() -> int[]", &maskops::cpu_cache_torch_allocator);
}

// The test-only ops, a library apart from the product (torch.ops.maskops_testing), so that
// torch.ops.maskops lists the product alone. Each runs a CUDA algorithm or its functors on the
// CPU, for CPU tests of the arithmetic the GPU runs (csrc/README.md, "What the CPU tests
// cannot check"); their CPU kernels sit beside the product's, in csrc/<op>/<op>_cpu.cpp, under
// TORCH_LIBRARY_IMPL(maskops_testing, CPU, m). Their fake kernels are in maskops/testing.py.
TORCH_LIBRARY(maskops_testing, m) {
  // ---- RoIAlign (csrc/roi_align): the arguments of maskops::multiscale_roi_align ----
  // The forward's ForwardElement functor, one output element at a time, all levels.
  m.def(
      "_multiscale_roi_align_forward_elementwise(Tensor[] features, Tensor rois, "
      "float[] spatial_scales, int pooled_height, int pooled_width, int sampling_ratio, "
      "bool aligned, float canonical_scale, float canonical_level, int k_min) -> Tensor");
  // The CUDA backward's host function (backward_gpu_algo): the atomic scatter, or with
  // deterministic the gather.
  m.def(
      "_multiscale_roi_align_backward_cuda_algo(Tensor grad, Tensor rois, "
      "float[] spatial_scales, int pooled_height, int pooled_width, SymInt batch_size, "
      "SymInt channels, SymInt[] heights, SymInt[] widths, int sampling_ratio, bool aligned, "
      "float canonical_scale, float canonical_level, int k_min, bool deterministic) "
      "-> Tensor[]");

  // ---- Mask paste (csrc/paste_masks): the arguments of maskops::paste_masks ----
  // The CUDA kernel's tiles; index64 forces its 64-bit index path.
  m.def(
      "_paste_masks_elementwise(Tensor masks, Tensor boxes, int height, int width, int padding, "
      "float? threshold, bool as_uint8, bool index64=False) -> Tensor");

  // ---- NMS (csrc/nms) ----
  // The CUDA NMS algorithm (IoU bitmask, then the blockwise gather), the arguments of
  // maskops::batched_nms (idxs optional). removed_shared_words: the most words of removed bits
  // a walk keeps in shared memory before it uses global memory (None: the GPU's limit, 5632),
  // so a test can run that layout.
  m.def(
      "_nms_bitmask(Tensor boxes, Tensor scores, Tensor? idxs, float iou_threshold, "
      "float? score_threshold=None, int? max_output=None, int? removed_shared_words=None) "
      "-> Tensor");
  // The segmented NMS of rpn_proposals' CUDA algorithm. S = valid.size(0) segments of seg_len
  // rows of boxes [S * seg_len, 4], each sorted by decreasing score; the first valid[s] rows
  // of segment s take part; classes (int64, optional) per row; order (int64) is the index
  // output for each row. Returns (index [S * seg_len]: segment s's kept order values from
  // s * seg_len, then -1; count [S]), at most max_output per segment (< 0: no limit).
  m.def(
      "_segmented_nms(Tensor boxes, Tensor? classes, Tensor order, Tensor valid, int seg_len, "
      "float iou_threshold, int max_output, int? removed_shared_words=None) -> (Tensor, Tensor)");

  // ---- Box coding (csrc/boxes): the arguments of maskops::decode_boxes / encode_boxes ----
  // The CUDA kernels' one-pass functors (device-style exp / log).
  m.def(
      "_decode_boxes_elementwise(Tensor rel_codes, Tensor boxes, float[] weights, float clamp) "
      "-> Tensor");
  m.def(
      "_encode_boxes_elementwise(Tensor reference_boxes, Tensor proposals, float[] weights) "
      "-> Tensor");

  // ---- RPN proposals (csrc/rpn): the arguments of maskops::rpn_proposals ----
  // The CUDA algorithm (one pass per candidate, one segmented NMS for the batch).
  m.def(
      "_rpn_proposals_elementwise(Tensor objectness, Tensor deltas, Tensor anchors, "
      "int[] image_sizes, int pre_nms_top_n, int post_nms_top_n, float nms_thresh, "
      "float score_thresh, float min_size, int[] num_anchors_per_level) "
      "-> (Tensor[], Tensor[])");
}
