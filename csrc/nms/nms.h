// NMS and box-IoU math, shared by nms_cpu.cpp and nms_cuda.cu.
//
// Boxes are (x1, y1, x2, y2). Half types are read in float32, float64 stays float64 (the
// "math type" T below).
//
// Greedy NMS visits boxes in decreasing score order (a stable sort, so equal scores go by
// index) and keeps a box unless a box kept before it overlaps it with IoU > iou_threshold.
// The suppression test, nms_overlap() > threshold, is torchvision's CPU expression operation
// for operation:
//   inter = max(0, min(x2a, x2b) - max(x1a, x1b)) * max(0, min(y2a, y2b) - max(y1a, y1b))
//   ovr   = inter / ((area_a + area_b) - inter),   area = (x2 - x1) * (y2 - y1)
// with std::max / std::min operand order (so NaN coordinates behave the same) and every
// operation rounded separately: a fused multiply-add here would round once instead of twice
// and could flip a decision that lies within an ulp of the threshold. On the GPU the *_rn
// intrinsics below are never fused; host files that include this header are compiled without
// contraction (common/no_fp_contract.h). A pair whose union is 0 gives 0/0 = NaN, which never
// suppresses: for thresholds >= 0 that is the same as calling its IoU 0.
//
// The GPU algorithm (run on the CPU too by the test-only op _nms_bitmask):
//   1. MaskBlock: for each sorted box `row` and each block of 64 sorted boxes, a 64-bit word
//      whose bit c says "row suppresses box 64 * block + c" (only boxes after `row`; with
//      class ids, only boxes of the same class: batched NMS is one pass).
//   2. GatherKept: a walk over the sorted boxes, 64 at a time, keeping a bit array of removed
//      boxes. resolve() settles one block of 64 sequentially (it needs only the block's
//      diagonal mask words, original indices and scores, which all the walk's threads stage
//      first); suppressed_by() then ORs the kept rows' words into every later block, which
//      the GPU does in parallel, one thread per block word. The walk's loop,
//      walk(), is written once for any number of cooperating threads: the GPU's gather kernel
//      runs it with a block of threads, the CPU test ops with one.
// Segmented NMS (SegmentedMask, SegmentedGather) runs many independent problems of the same
// size at once, each over only its own valid boxes: one mask tile set and one walk per
// segment, so the work is the sum of the segments' (for the RPN, linear in the batch).
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#include "common/host_device.h"

namespace maskops {
namespace nms {

constexpr int kBlock = 64;  // boxes per mask word

// ---- separately rounded arithmetic (see above) ----
// float and double overloads pin the rounding on the GPU; the templates serve host code on
// GCC vector types.
#if defined(__CUDA_ARCH__)
#define MASKOPS_RN(device_expr, host_expr) device_expr
#else
#define MASKOPS_RN(device_expr, host_expr) host_expr
#endif
HOST_DEVICE inline float add_rn(float a, float b) { return MASKOPS_RN(__fadd_rn(a, b), a + b); }
HOST_DEVICE inline float sub_rn(float a, float b) { return MASKOPS_RN(__fsub_rn(a, b), a - b); }
HOST_DEVICE inline float mul_rn(float a, float b) { return MASKOPS_RN(__fmul_rn(a, b), a * b); }
HOST_DEVICE inline float div_rn(float a, float b) { return MASKOPS_RN(__fdiv_rn(a, b), a / b); }
HOST_DEVICE inline double add_rn(double a, double b) { return MASKOPS_RN(__dadd_rn(a, b), a + b); }
HOST_DEVICE inline double sub_rn(double a, double b) { return MASKOPS_RN(__dsub_rn(a, b), a - b); }
HOST_DEVICE inline double mul_rn(double a, double b) { return MASKOPS_RN(__dmul_rn(a, b), a * b); }
HOST_DEVICE inline double div_rn(double a, double b) { return MASKOPS_RN(__ddiv_rn(a, b), a / b); }
#undef MASKOPS_RN
template <typename V>
inline V add_rn(V a, V b) {
  return a + b;
}
template <typename V>
inline V sub_rn(V a, V b) {
  return a - b;
}
template <typename V>
inline V mul_rn(V a, V b) {
  return a * b;
}
template <typename V>
inline V div_rn(V a, V b) {
  return a / b;
}

// std::max(a, b) and std::min(a, b), written out so that they also apply lane-wise to GCC
// vector types. With a NaN operand both return `a`.
template <typename T>
HOST_DEVICE inline T max_first(T a, T b) {
  return a < b ? b : a;
}
template <typename T>
HOST_DEVICE inline T min_first(T a, T b) {
  return b < a ? b : a;
}

template <typename T>
HOST_DEVICE inline T box_area_of(T x1, T y1, T x2, T y2) {
  return mul_rn(sub_rn(x2, x1), sub_rn(y2, y1));
}

// torchvision's overlap ratio for NMS (see the header comment). `a` is the kept box. T may be
// a scalar or (host only) a GCC vector type, where T{} is the zero vector.
template <typename T>
HOST_DEVICE inline T nms_overlap(T ax1, T ay1, T ax2, T ay2, T a_area, T bx1, T by1, T bx2, T by2,
                                 T b_area) {
  const T xx1 = max_first(ax1, bx1);
  const T yy1 = max_first(ay1, by1);
  const T xx2 = min_first(ax2, bx2);
  const T yy2 = min_first(ay2, by2);
  const T w = max_first(T{}, sub_rn(xx2, xx1));
  const T h = max_first(T{}, sub_rn(yy2, yy1));
  const T inter = mul_rn(w, h);
  return div_rn(inter, sub_rn(add_rn(a_area, b_area), inter));
}

// Does kept box a (4 coordinates) suppress box b? `threshold` is already in T (see
// threshold_in<T>), so the float comparison equals torchvision's `float > double` one.
template <typename T>
HOST_DEVICE inline bool suppresses(const T* a, const T* b, T threshold) {
  const T ov = nms_overlap(a[0], a[1], a[2], a[3], box_area_of(a[0], a[1], a[2], a[3]), b[0], b[1],
                           b[2], b[3], box_area_of(b[0], b[1], b[2], b[3]));
  return ov > threshold;
}

// The largest T not above `threshold` (host only): for any T value x, x > result exactly
// when (double)x > threshold, which is how torchvision compares its float IoU with a double.
template <typename T>
inline T threshold_in(double threshold) {
  T t = static_cast<T>(threshold);
  if (static_cast<double>(t) > threshold) {
    t = std::nextafter(t, -std::numeric_limits<T>::infinity());
  }
  return t;
}

// IoU for box_iou: intersection over union, NaN if a coordinate is NaN, and 0 (not 0/0) when
// the union is 0, e.g. for two zero-area boxes.
template <typename T>
HOST_DEVICE inline T max_nan(T a, T b) {
  return (a < b || b != b) ? b : a;
}
template <typename T>
HOST_DEVICE inline T min_nan(T a, T b) {
  return (b < a || b != b) ? b : a;
}

template <typename T>
HOST_DEVICE inline T pair_iou(T ax1, T ay1, T ax2, T ay2, T bx1, T by1, T bx2, T by2) {
  const T w = sub_rn(min_nan(ax2, bx2), max_nan(ax1, bx1));
  const T h = sub_rn(min_nan(ay2, by2), max_nan(ay1, by1));
  const T inter = mul_rn(w > T(0) || w != w ? w : T(0), h > T(0) || h != h ? h : T(0));
  const T uni =
      sub_rn(add_rn(box_area_of(ax1, ay1, ax2, ay2), box_area_of(bx1, by1, bx2, by2)), inter);
  return uni == T(0) ? T(0) : div_rn(inter, uni);
}

// ---- box_area / box_iou bodies (one output element per call) ----

template <typename scalar_t, typename T>
struct BoxArea {
  const scalar_t* boxes;  // [N, 4] contiguous
  scalar_t* out;          // [N]
  HOST_DEVICE void operator()(int64_t i) const {
    const scalar_t* b = boxes + 4 * i;
    out[i] = static_cast<scalar_t>(box_area_of(static_cast<T>(b[0]), static_cast<T>(b[1]),
                                               static_cast<T>(b[2]), static_cast<T>(b[3])));
  }
};

template <typename scalar_t, typename T>
struct BoxIoU {
  const scalar_t* boxes1;  // [N, 4] contiguous
  const scalar_t* boxes2;  // [M, 4] contiguous
  int64_t m;
  scalar_t* out;  // [N, M]

  HOST_DEVICE void element(int64_t i, int64_t j) const {
    const scalar_t* a = boxes1 + 4 * i;
    const scalar_t* b = boxes2 + 4 * j;
    out[i * m + j] = static_cast<scalar_t>(pair_iou(
        static_cast<T>(a[0]), static_cast<T>(a[1]), static_cast<T>(a[2]), static_cast<T>(a[3]),
        static_cast<T>(b[0]), static_cast<T>(b[1]), static_cast<T>(b[2]), static_cast<T>(b[3])));
  }
  // One output element (GPU: one thread each).
  HOST_DEVICE void operator()(int64_t k) const { element(k / m, k % m); }
};

// ---- the GPU NMS algorithm ----

// One 64-bit word of the suppression mask. Sorted boxes [n, 4] in the math type T, optional
// class ids in the same order; mask is [n, col_blocks] row-major. Words left of the diagonal
// (column block < row block) are never read and are not computed.
template <typename T>
struct MaskBlock {
  const T* boxes;
  const int64_t* classes;  // nullptr: one class
  int64_t n, col_blocks;
  T threshold;  // threshold_in<T>(iou_threshold)
  uint64_t* mask;

  // The word of `row` for column block cb, whose (up to 64) boxes and class ids are at
  // cols / col_classes: global memory on the CPU, a shared-memory copy on the GPU.
  HOST_DEVICE uint64_t word(int64_t row, int64_t cb, const T* cols,
                            const int64_t* col_classes) const {
    const T* a = boxes + 4 * row;
    const int64_t first = cb * kBlock;
    const int64_t count = n - first < kBlock ? n - first : kBlock;
    uint64_t bits = 0;
    for (int64_t c = row + 1 > first ? row + 1 - first : 0; c < count; ++c) {
      if (classes != nullptr && col_classes[c] != classes[row]) continue;
      if (suppresses(a, cols + 4 * c, threshold)) bits |= uint64_t(1) << c;
    }
    return bits;
  }
};

// A barrier for a loop run by a single thread.
struct NoSync {
  HOST_DEVICE void operator()() const {}
};

// One tile of the mask: the words of row block rb against column block cb (only tiles on or
// right of the diagonal, within the first f.n boxes), computed by `threads` cooperating threads
// (this one is tid) after staging the column block's boxes and class ids in cols[4 * kBlock]
// and col_classes[kBlock]. On the GPU a block of 64 threads runs each tile with shared-memory
// staging and __syncthreads() as sync(); on the CPU one thread does, with local arrays.
template <typename T, typename Sync>
HOST_DEVICE inline void mask_tile(const MaskBlock<T>& f, int64_t rb, int64_t cb, int tid,
                                  int threads, T* cols, int64_t* col_classes, const Sync& sync) {
  if (cb < rb) return;  // left of the diagonal: the gather never reads these words
  if (rb * kBlock >= f.n || cb * kBlock >= f.n) return;  // past the boxes that take part
  for (int t = tid; t < kBlock; t += threads) {
    const int64_t c = cb * kBlock + t;
    if (c >= f.n) continue;
    for (int k = 0; k < 4; ++k) cols[4 * t + k] = f.boxes[4 * c + k];
    if (f.classes != nullptr) col_classes[t] = f.classes[c];
  }
  sync();
  for (int t = tid; t < kBlock; t += threads) {
    const int64_t row = rb * kBlock + t;
    if (row >= f.n) continue;
    f.mask[row * f.col_blocks + cb] =
        f.word(row, cb, cols, f.classes != nullptr ? col_classes : nullptr);
  }
}

// The walk that turns the mask into kept indices.
//
// Without a score threshold every kept box is output. With one, a box's score decides as
// `score > score_threshold` in float64; boxes with a NaN score (sorted first) still suppress
// others but are not output, and the walk ends at the first box at or below the threshold
// (all later ones are too). This equals running plain NMS and then filtering its output.
// The walk also ends once max_output boxes are output (max_output < 0: no limit).

// What resolve() reads of one block of 64 sorted boxes, staged by the walk's threads (shared
// memory on the GPU): row b's diagonal mask word, its original index and (with a score
// threshold) its score.
struct StagedBlock {
  uint64_t diag[kBlock];
  int64_t order[kBlock];
  double score[kBlock];
};

struct GatherKept {
  const uint64_t* mask;  // [n, col_blocks]
  int64_t n, col_blocks;
  const int64_t* order;  // sorted position -> original index
  const double* scores;  // sorted scores in float64, or nullptr without a score threshold
  double score_threshold;
  int64_t max_output;
  int64_t* out;  // kept original indices, in order

  // Stages row b of block nb into s (rows past n: a zero mask word, nothing else read).
  HOST_DEVICE void stage(int64_t nb, int b, StagedBlock& s) const {
    const int64_t row = nb * kBlock + b;
    if (row >= n) {
      s.diag[b] = 0;
      return;
    }
    s.diag[b] = mask[row * col_blocks + nb];
    s.order[b] = order[row];
    if (scores != nullptr) s.score[b] = scores[row];
  }

  // Settles block nb, staged in s. `removed` has the bits set by kept boxes of earlier blocks.
  // Appends output indices at out[count...]. Returns the kept boxes of the block as bits; sets
  // done when the walk is over.
  HOST_DEVICE uint64_t resolve(int64_t nb, uint64_t removed, const StagedBlock& s, int64_t& count,
                               bool& done) const {
    uint64_t kept = 0;
    const int64_t first = nb * kBlock;
    for (int b = 0; b < kBlock && first + b < n; ++b) {
      if ((removed >> b) & 1) continue;
      bool emit = true;
      if (scores != nullptr) {
        const double sc = s.score[b];
        if (sc == sc) {
          if (!(sc > score_threshold)) {
            done = true;
            return kept;
          }
        } else {
          emit = false;  // NaN score: suppresses, never output
        }
      }
      kept |= uint64_t(1) << b;
      removed |= s.diag[b];
      if (emit) {
        out[count++] = s.order[b];
        if (count == max_output) {
          done = true;
          return kept;
        }
      }
    }
    return kept;
  }

  // The bits of column block j (> nb) removed by the kept boxes of block nb.
  HOST_DEVICE uint64_t suppressed_by(int64_t nb, uint64_t kept, int64_t j) const {
    uint64_t acc = 0;
    while (kept != 0) {
      const int b = lowest_bit(kept);
      acc |= mask[(nb * kBlock + b) * col_blocks + j];
      kept &= kept - 1;
    }
    return acc;
  }
};

// What the threads of one walk share (shared memory on the GPU).
struct WalkShared {
  StagedBlock block;
  uint64_t kept;
  int64_t count;
  bool done;
};

// Where a gather's walks keep their removed bits, ceil(n / 64) words each: in shared memory
// while they fit in `shared_words` (the GPU's limit, kSharedRemovedWords, by default: 44 KiB,
// 360,448 boxes; with WalkShared that stays under the 48 KiB a block gets without opting in),
// else in one global buffer of walks * col_blocks words, walk s's at s * col_blocks
// (walk_removed()). The CUDA wrappers and the CPU twins decide here; the twins take a smaller
// limit from their test-only ops to run the global-memory layout at small sizes.
constexpr int64_t kSharedRemovedWords = 44 * 1024 / 8;

struct RemovedPlacement {
  int64_t shared_words;  // dynamic shared memory per walk, in words; 0 when global
  int64_t global_words;  // the global buffer, for all walks; 0 when shared
};

inline RemovedPlacement place_removed(int64_t col_blocks, int64_t walks,
                                      int64_t shared_words = kSharedRemovedWords) {
  if (col_blocks <= shared_words) return {col_blocks, 0};
  return {0, walks * col_blocks};
}

// Walk s's removed bits: its part of the global buffer, or (global == nullptr) `shared`.
HOST_DEVICE inline uint64_t* walk_removed(uint64_t* global, uint64_t* shared, int64_t s,
                                          int64_t col_blocks) {
  return global != nullptr ? global + s * col_blocks : shared;
}

// The walk of GatherKept over the mask, run by `threads` cooperating threads (this one is
// `tid`); sync() is a barrier among them. removed holds ceil(n / 64) words. Per block of 64
// sorted boxes: the threads stage the block's diagonal mask words, indices and scores, thread 0
// settles the block (resolve), then the threads OR the kept rows' words into the removed bits
// of every later block. Returns the number of indices written to g.out.
template <typename Sync>
HOST_DEVICE inline int64_t walk(const GatherKept& g, uint64_t* removed, WalkShared& sh, int tid,
                                int threads, const Sync& sync) {
  const int64_t blocks = (g.n + kBlock - 1) / kBlock;
  for (int64_t j = tid; j < blocks; j += threads) removed[j] = 0;
  if (tid == 0) {
    sh.count = 0;
    sh.done = false;
  }
  sync();
  for (int64_t nb = 0; nb < blocks; ++nb) {
    for (int b = tid; b < kBlock; b += threads) g.stage(nb, b, sh.block);
    sync();
    if (tid == 0) sh.kept = g.resolve(nb, removed[nb], sh.block, sh.count, sh.done);
    sync();
    if (sh.done) break;
    if (sh.kept != 0) {
      for (int64_t j = nb + 1 + tid; j < blocks; j += threads)
        removed[j] |= g.suppressed_by(nb, sh.kept, j);
    }
    sync();
  }
  return sh.count;
}

// ---- segmented NMS ----
//
// S segments of seg_len boxes laid end to end (segment s at sorted rows [s * seg_len,
// (s + 1) * seg_len)), each sorted by decreasing score; only the first valid[s] boxes of a
// segment take part (the rest, e.g. rejected RPN candidates, are left out). The mask is
// [S, seg_len, col_blocks] with col_blocks = ceil(seg_len / 64); words of rows or column blocks
// past a segment's valid boxes are neither computed nor read (mask_tile skips them).

template <typename T>
struct SegmentedMask {
  const T* boxes;          // [S * seg_len, 4]
  const int64_t* classes;  // [S * seg_len] or nullptr
  const int64_t* valid;    // [S]
  int64_t seg_len, col_blocks;
  T threshold;
  uint64_t* mask;

  HOST_DEVICE MaskBlock<T> segment(int64_t s) const {
    return MaskBlock<T>{boxes + 4 * s * seg_len,
                        classes != nullptr ? classes + s * seg_len : nullptr,
                        valid[s],
                        col_blocks,
                        threshold,
                        mask + s * seg_len * col_blocks};
  }
};

struct SegmentedGather {
  const uint64_t* mask;  // SegmentedMask's
  const int64_t* valid;  // [S]
  int64_t seg_len, col_blocks;
  const int64_t* order;  // [S * seg_len]: sorted row -> the index to output
  int64_t max_output;    // per segment; < 0: no limit
  int64_t* out;          // [S * seg_len]: segment s's kept indices from out + s * seg_len
  int64_t* count;        // [S]

  HOST_DEVICE GatherKept segment(int64_t s) const {
    return GatherKept{mask + s * seg_len * col_blocks,
                      valid[s],
                      col_blocks,
                      order + s * seg_len,
                      nullptr,
                      0.0,
                      max_output,
                      out + s * seg_len};
  }
};

}  // namespace nms
}  // namespace maskops
