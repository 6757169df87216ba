// The inference embedding's weight packed once, ahead of the calls (embed_tokens_pack in ../embed_tokens.h).
//
// Each CPU embed_tokens call on the direct, widened and AMX paths packs the weight into the layout its kernels read
// (cpu/patch_gemm.h's panels of W^T, or amx_patch_gemm.h's tiles) before multiplying. At small batches that copy is
// a large part of the call. Patch 32, 224x224, D = 192-768, 2 threads, AMD EPYC Zen 3 (AVX2), time packing per call /
// time with the weight packed ahead (benchmarks/results/kernels-cpu-2core-zen3-infer-prepacked.json): fp32 B = 1
// 1.22-1.42x, B = 2 1.12-1.34x, B = 16 1.02-1.05x, B = 64 0.98-1.10x (noise); bf16 (widened: the weight converted
// to fp32 as well as packed) B = 1 1.75-2.12x, B = 2 1.30-1.51x. A deployed model's weight does not change between
// calls, so a caller may pack it once and pass the blob with every call.
//
// The blob is a 1-D uint8 tensor: a 64-byte header, then the packed weight (64-byte aligned, as CPU allocations
// are). The header names what was packed and for which kernel: the layout (which depends on the image's dtype and
// the CPU: fp32 panels, bf16 VNNI panels, AMX tiles), the patch kernels' instruction set (the fp32 panels' layout
// differs between AVX2 and AVX-512), the weight's sizes, its data pointer and its version counter at packing time.
// A call uses a blob only where all of these match the call's weight and path (prepacked()), else it packs as
// usual: a blob for another weight, another CPU path, or a weight changed in place since (its version moved on)
// costs time, never correctness. What the version counter cannot see is a change made through a tensor that does
// not share it (`weight.data.copy_(...)`); a caller that edits weights that way must pack again.
#pragma once

#include <cstdint>
#include <optional>

#include <ATen/core/Tensor.h>

namespace mcl::cpu::prepack {

// The packed layouts; kNone: the call's path packs nothing a blob could hold (patch-matrix tiles: any dtype or
// strides the kernels do not read directly), or the CPU has no patch kernels.
enum class Kind : int64_t { kNone = 0, kPanelsF32 = 1, kPanelsBf16 = 2, kAmx = 3 };

// The layout a call on images `x` with patch P reads its weight in: kPanelsF32 for fp32 images on the direct path
// and for bf16 ones on the widened path, kPanelsBf16 for bf16 on the direct path, kAmx for the AMX tiles.
Kind kind_for(const at::Tensor& x, int64_t P);

// The blob for `weight` [D, C, P, P] as a contiguous image of its dtype would be embedded; an empty blob where
// that path has nothing to pack (Kind::kNone) or where the weight's changes cannot be tracked (an inference tensor:
// no version counter).
at::Tensor pack(const at::Tensor& weight);

// The packed weight inside `blob` when it holds `weight`, unchanged since packing, in the layout `kind` for this
// CPU's kernels; else nullptr (the call packs its own).
const void* prepacked(const std::optional<at::Tensor>& blob, const at::Tensor& weight, Kind kind);

// Throws unless `blob` is absent or a 1-D uint8 CPU tensor (what pack() returns): a wrong type is a caller's
// mistake, where a mismatched blob is merely not used.
void check_blob(const std::optional<at::Tensor>& blob);

}  // namespace mcl::cpu::prepack
