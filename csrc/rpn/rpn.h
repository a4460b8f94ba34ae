// The per-candidate math of the RPN proposal step, shared by rpn_cpu.cpp and rpn_cuda.cu.
//
// A candidate is one of the top-scoring anchors of a level in one image (the top-k itself is
// torch.topk, see rpn_host.h). Per candidate, as torchvision's RegionProposalNetwork:
//   score = sigmoid(logit);
//   box   = the anchor's deltas decoded with BoxCoder weights (1, 1, 1, 1) (box_coder.h), then
//           clipped to its image;
//   kept  = both sides of the clipped box >= min_size, and score >= score_thresh.
// Kept candidates then go through NMS per (image, level).
//
// As in box_coder.h, the CPU computes exp (and the sigmoid) with torch's own vectorised
// functions between two passes (LogScales, then Finish), so float32 results are
// torchvision's bit for bit; the GPU functor (Candidate) does everything in one pass with the
// device's expf, as torch's CUDA kernels do.
#pragma once

#include <cstdint>

#include "boxes/box_coder.h"
#include "common/host_device.h"

namespace maskops {
namespace rpn {

using boxes::Weights;

template <typename T>
HOST_DEVICE inline T sigmoid(T x) {
  return boxes::div_rn(T(1), boxes::add_rn(T(1), boxes::exp_math(-x)));
}

// The inputs every pass reads, in the math type T (float, or double for float64 deltas).
template <typename T>
struct Candidates {
  const T* objectness;           // [B, A] logits
  const T* deltas;               // [B, A, 4]
  const T* anchors;              // [A, 4], or [B, A, 4]
  int64_t anchors_image_stride;  // 0 when every image shares the anchors, else 4 * A
  const int64_t* index;          // [B, K] anchor index of each candidate
  const int64_t* image_sizes;    // [B, 2] (height, width)
  int64_t num_anchors;           // A
  int64_t per_image;             // K
  Weights<T> w;
  T clip;
  T min_size;
  T score_thresh;

  HOST_DEVICE int64_t image(int64_t i) const { return i / per_image; }
  HOST_DEVICE int64_t anchor_index(int64_t i) const { return image(i) * num_anchors + index[i]; }
  HOST_DEVICE const T* delta(int64_t i) const { return deltas + 4 * anchor_index(i); }
  HOST_DEVICE const T* anchor(int64_t i) const {
    return anchors + image(i) * anchors_image_stride + 4 * index[i];
  }
  HOST_DEVICE T logit(int64_t i) const { return objectness[anchor_index(i)]; }

  HOST_DEVICE void log_scales(int64_t i, T& dw, T& dh) const {
    boxes::decode_log_scales(delta(i), w, clip, dw, dh);
  }

  // Decodes and clips candidate i into box[4]; returns whether it is kept.
  HOST_DEVICE bool finish(int64_t i, T exp_dw, T exp_dh, T score, T* box) const {
    boxes::decode_box(anchor(i), delta(i), exp_dw, exp_dh, w, box);
    const int64_t b = image(i);
    const T height = static_cast<T>(image_sizes[2 * b]);
    const T width = static_cast<T>(image_sizes[2 * b + 1]);
    box[0] = boxes::clamp_to(box[0], width);
    box[1] = boxes::clamp_to(box[1], height);
    box[2] = boxes::clamp_to(box[2], width);
    box[3] = boxes::clamp_to(box[3], height);
    return boxes::large_enough<T, T>(box, min_size) & (score >= score_thresh);
  }
};

// CPU pass 1: log-scales of candidate i into buf[2 (i - first)] and the next slot (buf holds
// one chunk of candidates, from `first` on).
template <typename T>
struct LogScales {
  Candidates<T> c;
  T* buf;
  int64_t first;
  HOST_DEVICE void operator()(int64_t i) const {
    T* e = buf + 2 * (i - first);
    c.log_scales(i, e[0], e[1]);
  }
};

// CPU pass 2: buf holds the exps, scores the sigmoids.
template <typename T>
struct Finish {
  Candidates<T> c;
  const T* buf;
  int64_t first;
  const T* scores;  // [B * K]
  T* boxes;         // [B * K, 4]
  bool* keep;       // [B * K]
  HOST_DEVICE void operator()(int64_t i) const {
    const T* e = buf + 2 * (i - first);
    keep[i] = c.finish(i, e[0], e[1], scores[i], boxes + 4 * i);
  }
};

// The GPU's one pass (test-only on the CPU). Writes what one class-aware NMS over all
// images needs: class = image * num_levels + level, and an NMS score that is the score for
// kept candidates and -inf for the others (so with an NMS score threshold of -inf they are
// never output and, sorting last, suppress nothing that is).
template <typename T>
struct Candidate {
  Candidates<T> c;
  const int64_t* level_of;  // [K] level of each candidate position
  int64_t num_levels;
  T* boxes;          // [B * K, 4]
  T* scores;         // [B * K]
  T* nms_scores;     // [B * K]
  int64_t* classes;  // [B * K]
  HOST_DEVICE void operator()(int64_t i) const {
    const T score = sigmoid(c.logit(i));
    T dw, dh;
    c.log_scales(i, dw, dh);
    const bool kept = c.finish(i, boxes::exp_math(dw), boxes::exp_math(dh), score, boxes + 4 * i);
    scores[i] = score;
    nms_scores[i] = kept ? score : -T(INFINITY);
    classes[i] = c.image(i) * num_levels + level_of[i % c.per_image];
  }
};

}  // namespace rpn
}  // namespace maskops
