// NMS, box IoU and box area on CUDA: launch logic only. The per-thread bodies (MaskBlock,
// GatherKept, BoxIoU, BoxArea) live in nms.h; the CPU runs the same bodies (the test-only op
// _nms_bitmask, and the CPU box ops), so CPU tests check the arithmetic and the walk this file
// launches.
//
// NMS, all on the current stream:
//   1. a stable descending sort of the scores; boxes (and class ids) gathered in score order;
//   2. the mask kernel: one 64-thread block per (row block, column block) pair on or right of
//      the diagonal, the block's 64 column boxes staged in shared memory, one thread per row
//      box writing one 64-bit word (nms.h's mask_tile(), which the CPU test op runs too).
//      With class ids the test is class-aware, so batched NMS is this same single launch;
//   3. the gather kernel: one block walks the mask 64 boxes at a time (nms.h's walk(), which
//      the CPU test op runs too), keeping the removed bits in shared memory (global memory past
//      360,448 boxes: place_removed()), and writes the kept indices and their count to device
//      memory. The mask is never copied to the host.
// The host steps around the launches are nms_host.h's nms_gpu_algo() and segmented_nms.h's
// segmented_nms_algo(), which the CPU twins run too; this file supplies the launches
// (CudaLaunch).
// segmented_nms_cuda (for the RPN) runs the same two kernels over many segments at once: a
// third grid dimension for the mask, one gather block per segment.
// The only host synchronisation is reading that count at the end: the output's size is the
// number of boxes kept.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sort.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/checks.h"
#include "common/launch_cuda.cuh"
#include "nms/nms.h"
#include "nms/nms_args.h"
#include "nms/nms_host.h"
#include "nms/segmented_nms.h"

namespace maskops {
namespace nms {
namespace {

constexpr int kGatherThreads = 256;
// gridDim.y limit of the mask kernel.
constexpr int64_t kMaxBlocks = 65535;

struct BlockSync {
  __device__ void operator()() const { __syncthreads(); }
};

// One 64-thread block per tile of the mask (nms.h's mask_tile()), staging in shared memory.
template <typename T>
__global__ void __launch_bounds__(kBlock) nms_mask_kernel(MaskBlock<T> f) {
  __shared__ T cols[4 * kBlock];
  __shared__ int64_t col_classes[kBlock];
  mask_tile(f, blockIdx.y, blockIdx.x, threadIdx.x, blockDim.x, cols, col_classes, BlockSync{});
}

// Segment blockIdx.z's tiles only.
template <typename T>
__global__ void __launch_bounds__(kBlock) segmented_mask_kernel(SegmentedMask<T> f) {
  __shared__ T cols[4 * kBlock];
  __shared__ int64_t col_classes[kBlock];
  mask_tile(f.segment(blockIdx.z), blockIdx.y, blockIdx.x, threadIdx.x, blockDim.x, cols,
            col_classes, BlockSync{});
}

// One block walks the mask (nms.h's walk()): the removed bits in dynamic shared memory, or
// walk s's part of removed_global when place_removed() put them there.
__device__ __forceinline__ int64_t gather_block(const GatherKept& g, uint64_t* removed_global,
                                                int64_t s) {
  extern __shared__ uint64_t removed_shared[];
  __shared__ WalkShared sh;
  return walk(g, walk_removed(removed_global, removed_shared, s, g.col_blocks), sh, threadIdx.x,
              blockDim.x, BlockSync{});
}
// (+ 256 bytes: ptxas pads and aligns the static part, 1,568 bytes for a 1,560-byte struct.)
static_assert(kSharedRemovedWords * sizeof(uint64_t) + sizeof(WalkShared) + 256 <= 48 * 1024,
              "the gather's shared memory must fit a block's default 48 KiB");

__global__ void __launch_bounds__(kGatherThreads)
    nms_gather_kernel(GatherKept g, uint64_t* removed_global, int64_t* count_out) {
  const int64_t count = gather_block(g, removed_global, 0);
  if (threadIdx.x == 0) *count_out = count;
}

// One block per segment (blockIdx.x).
__global__ void __launch_bounds__(kGatherThreads)
    segmented_gather_kernel(SegmentedGather f, uint64_t* removed_global) {
  const int64_t s = blockIdx.x;
  const int64_t count = gather_block(f.segment(s), removed_global, s);
  if (threadIdx.x == 0) f.count[s] = count;
}

// The CUDA part of nms_gpu_algo() (nms_host.h) and segmented_nms_algo() (segmented_nms.h).
struct CudaLaunch {
  void check(int64_t n) const {
    TORCH_CHECK((n + kBlock - 1) / kBlock <= kMaxBlocks, "nms on CUDA takes at most ",
                kMaxBlocks * kBlock, " boxes, got ", n);
  }
  void check(const SegmentedPlan& plan) const {
    TORCH_CHECK(plan.col_blocks <= kMaxBlocks && plan.segments <= kMaxBlocks,
                "segmented nms on CUDA takes at most ", kMaxBlocks, " segments of at most ",
                kMaxBlocks * kBlock, " boxes");
  }
  template <typename T>
  void mask(const MaskBlock<T>& f) const {
    const dim3 grid(static_cast<unsigned>(f.col_blocks), static_cast<unsigned>(f.col_blocks));
    nms_mask_kernel<T><<<grid, kBlock, 0, c10::cuda::getCurrentCUDAStream()>>>(f);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  template <typename T>
  void segmented_mask(const SegmentedMask<T>& f, const SegmentedPlan& plan) const {
    const dim3 grid(static_cast<unsigned>(plan.col_blocks), static_cast<unsigned>(plan.col_blocks),
                    static_cast<unsigned>(plan.segments));
    segmented_mask_kernel<T><<<grid, kBlock, 0, c10::cuda::getCurrentCUDAStream()>>>(f);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  void gather(const GatherKept& g, const RemovedPlacement& rp, uint64_t* removed_global,
              int64_t* count) const {
    nms_gather_kernel<<<1, kGatherThreads, rp.shared_words * sizeof(uint64_t),
                        c10::cuda::getCurrentCUDAStream()>>>(g, removed_global, count);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  void segmented_gather(const SegmentedGather& g, const SegmentedPlan& plan,
                        const RemovedPlacement& rp, uint64_t* removed_global) const {
    segmented_gather_kernel<<<static_cast<unsigned>(plan.segments), kGatherThreads,
                              rp.shared_words * sizeof(uint64_t),
                              c10::cuda::getCurrentCUDAStream()>>>(g, removed_global);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

at::Tensor nms_cuda_impl(const at::Tensor& boxes, const at::Tensor& scores,
                         const c10::optional<at::Tensor>& idxs, double iou_threshold,
                         c10::optional<double> score_threshold, c10::optional<int64_t> max_output) {
  c10::cuda::CUDAGuard guard(boxes.device());
  return nms_gpu_algo(boxes, scores, idxs, iou_threshold, score_threshold, max_output,
                      kSharedRemovedWords, CudaLaunch{});
}

}  // namespace

SegmentedKept segmented_nms_cuda(const at::Tensor& boxes, const at::Tensor& classes,
                                 const at::Tensor& order, const at::Tensor& valid, int64_t seg_len,
                                 double iou_threshold, int64_t max_output) {
  c10::cuda::CUDAGuard guard(boxes.device());
  return segmented_nms_algo(boxes, classes, order, valid, seg_len, iou_threshold, max_output,
                            kSharedRemovedWords, CudaLaunch{});
}

namespace {

at::Tensor nms_cuda(const at::Tensor& boxes, const at::Tensor& scores, double iou_threshold,
                    c10::optional<double> score_threshold, c10::optional<int64_t> max_output) {
  return nms_cuda_impl(boxes, scores, c10::nullopt, iou_threshold, score_threshold, max_output);
}

at::Tensor batched_nms_cuda(const at::Tensor& boxes, const at::Tensor& scores,
                            const at::Tensor& idxs, double iou_threshold,
                            c10::optional<double> score_threshold,
                            c10::optional<int64_t> max_output) {
  return nms_cuda_impl(boxes, scores, idxs, iou_threshold, score_threshold, max_output);
}

at::Tensor box_area_cuda(const at::Tensor& boxes) {
  check_boxes(boxes, "boxes");
  c10::cuda::CUDAGuard guard(boxes.device());
  const at::Tensor b = boxes.contiguous();
  at::Tensor out = at::empty({b.size(0)}, b.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, b.scalar_type(), "box_area_cuda", [&] {
    using T = at::opmath_type<scalar_t>;
    cuda_for_each(b.size(0),
                  BoxArea<scalar_t, T>{b.data_ptr<scalar_t>(), out.data_ptr<scalar_t>()});
  });
  return out;
}

at::Tensor box_iou_cuda(const at::Tensor& boxes1, const at::Tensor& boxes2) {
  check_box_iou_args(boxes1, boxes2);
  c10::cuda::CUDAGuard guard(boxes1.device());
  const at::Tensor a = boxes1.contiguous(), b = boxes2.contiguous();
  at::Tensor out = at::empty({a.size(0), b.size(0)}, a.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "box_iou_cuda", [&] {
    using T = at::opmath_type<scalar_t>;
    cuda_for_each(out.numel(), BoxIoU<scalar_t, T>{a.data_ptr<scalar_t>(), b.data_ptr<scalar_t>(),
                                                   b.size(0), out.data_ptr<scalar_t>()});
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(maskops, CUDA, m) {
  m.impl("nms", &nms_cuda);
  m.impl("batched_nms", &batched_nms_cuda);
  m.impl("box_area", &box_area_cuda);
  m.impl("box_iou", &box_iou_cuda);
}

}  // namespace nms
}  // namespace maskops
