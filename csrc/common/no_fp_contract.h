// Include in a CPU file, after the system and ATen headers and before the op's own headers:
// the code that follows is compiled without floating-point contraction, so that no multiply
// and add fuse into one FMA and every operation rounds separately, as torch's and
// torchvision's do. The box arithmetic (IoU, box coding, proposals) then matches theirs
// bit for bit; the AVX-512 clones would otherwise fuse e.g. `(area_a + area_b) - w * h`.
// (Including this header changes the rest of the translation unit; it is not a declaration.)
#pragma once

#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif
