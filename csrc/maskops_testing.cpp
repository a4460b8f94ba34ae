// The test-only ops, a library apart from the product (torch.ops.maskops_testing), so that
// torch.ops.maskops lists the product alone. Each runs a CUDA algorithm or its functors on the
// CPU, for CPU tests of the arithmetic the GPU runs (csrc/README.md, "What the CPU tests
// cannot check"); their CPU kernels sit beside the product's, in csrc/<op>/<op>_cpu.cpp, under
// TORCH_LIBRARY_IMPL(maskops_testing, CPU, m). Their fake kernels are in maskops/testing.py.
#include <torch/library.h>

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
