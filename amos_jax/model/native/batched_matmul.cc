// Strided, doubly batched single-precision matrix products for XLA:CPU (an FFI
// custom call).
//
// For every batch index (i0, i1) < (n0, n1):
//   C[i0, i1] = op(A[i0, i1]) @ op(B[i0, i1])      (m x k) @ (k x n) -> (m x n)
// where each matrix is row-major at offset i0 * s0 + i1 * s1 of its buffer with
// leading dimension ld, and op transposes it when t = 1. Attention's products read
// the heads of a (B, T, N, Dh) array in place this way: no transposed copies.
//
// XLA:CPU runs a batched dot on one core; here the batch is shared among the
// caller and the intra-op thread pool's threads. A register-blocked kernel computes
// R rows x 2 vectors of C at a time from broadcast elements of op(A), read in place
// whatever its layout, and vector rows of op(B), copied row-major into the thread's
// scratch first where B is stored transposed. It keeps the R x 2 accumulators in
// registers over the whole k loop: at attention's sizes (k = 64..128) a matrix fits
// in L1/L2 and no cache blocking is needed. The kernel
// is compiled for AVX-512, AVX2 + FMA and the baseline ISA, and the best one the CPU
// has runs (`amos_batched_matmul_isa`).
#include <cstdint>
#include <cstring>
#include <vector>

#include "isa.h"
#include "kernels.h"
#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using GemmFn = void (*)(const float*, int64_t, int64_t, const float*, int64_t, float*,
                        int64_t, int64_t, int64_t, int64_t);

struct Isa {
  const char* name;
  GemmFn gemm;
};

#define AMOS_BATCHED_MATMUL_BUILD(W, R)                                                 \
  AMOS_GEMM_KERNEL(W, R)                                                                \
  const Isa kBuild{kName, Gemm};

// R x 2 vectors of accumulators: AVX2's 16 ymm registers hold 6 x 2, 2 for B and 1
// for the broadcast A; AVX-512's 32 zmm registers 8 x 2.
AMOS_NATIVE_PER_ISA(AMOS_BATCHED_MATMUL_BUILD, (4, 4), (8, 6), (16, 8))

const Isa kIsas[] = AMOS_NATIVE_BUILDS;  // best first
Isa g_isa = amos_native::Best(kIsas);

struct Operand {
  int64_t s0, s1, ld, t;
};

// Highest element index a batch of matrices touches, plus one.
int64_t Extent(const Operand& x, int64_t n0, int64_t n1, int64_t rows, int64_t cols) {
  // Stored shape: (rows x cols), or (cols x rows) when transposed.
  int64_t r = x.t ? cols : rows, c = x.t ? rows : cols;
  return (n0 - 1) * x.s0 + (n1 - 1) * x.s1 + (r - 1) * x.ld + c;
}

// B^T stored (n x k, leading dimension ld) into row-major k x n `out`: the kernel
// loads B's rows as vectors. A needs no copy: its elements are broadcast one by one.
void PackTransposed(const float* x, int64_t ld, int64_t k, int64_t n, float* out) {
  for (int64_t j = 0; j < n; ++j)
    for (int64_t p = 0; p < k; ++p) out[p * n + j] = x[j * ld + p];
}

ffi::Error BatchedMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> a,
                         ffi::Buffer<ffi::F32> b, ffi::ResultBuffer<ffi::F32> c,
                         int64_t n0, int64_t n1, int64_t m, int64_t n, int64_t k,
                         int64_t ta, int64_t a0, int64_t a1, int64_t lda,
                         int64_t tb, int64_t b0, int64_t b1, int64_t ldb,
                         int64_t c0, int64_t c1, int64_t ldc) {
  const Operand A{a0, a1, lda, ta}, B{b0, b1, ldb, tb}, C{c0, c1, ldc, 0};
  if (n0 < 1 || n1 < 1 || m < 1 || n < 1 || k < 1 ||
      Extent(A, n0, n1, m, k) > static_cast<int64_t>(a.element_count()) ||
      Extent(B, n0, n1, k, n) > static_cast<int64_t>(b.element_count()) ||
      Extent(C, n0, n1, m, n) > static_cast<int64_t>(c->element_count())) {
    return ffi::Error::InvalidArgument(
        "amos_batched_matmul: the strides reach past a buffer (a caller bug)");
  }
  const float* pa = a.typed_data();
  const float* pb = b.typed_data();
  float* pc = c->typed_data();
  const GemmFn gemm = g_isa.gemm;
  // op(A)[i, p] sits at i * ars + p * acs.
  const int64_t ars = ta ? 1 : lda, acs = ta ? lda : 1;
  auto item = [=](int64_t i, std::vector<float>& scratch) {
    const int64_t i0 = i / n1, i1 = i % n1;
    const float* bi = pb + i0 * b0 + i1 * b1;
    int64_t ldbi = ldb;
    if (tb) {
      scratch.resize(k * n);
      PackTransposed(bi, ldb, k, n, scratch.data());
      bi = scratch.data();
      ldbi = n;
    }
    gemm(pa + i0 * a0 + i1 * a1, ars, acs, bi, ldbi, pc + i0 * c0 + i1 * c1, ldc, m, n, k);
  };
  amos_native::ParallelFor(pool, n0 * n1, [item](int64_t i) {
    thread_local std::vector<float> scratch;
    item(i, scratch);
  });
  return ffi::Error::Success();
}

}  // namespace

AMOS_NATIVE_ISA_SWITCH(amos_batched_matmul, kIsas, g_isa)

XLA_FFI_DEFINE_HANDLER_SYMBOL(AmosBatchedMatmul, BatchedMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("n0")
                                  .Attr<int64_t>("n1")
                                  .Attr<int64_t>("m")
                                  .Attr<int64_t>("n")
                                  .Attr<int64_t>("k")
                                  .Attr<int64_t>("ta")
                                  .Attr<int64_t>("a0")
                                  .Attr<int64_t>("a1")
                                  .Attr<int64_t>("lda")
                                  .Attr<int64_t>("tb")
                                  .Attr<int64_t>("b0")
                                  .Attr<int64_t>("b1")
                                  .Attr<int64_t>("ldb")
                                  .Attr<int64_t>("c0")
                                  .Attr<int64_t>("c1")
                                  .Attr<int64_t>("ldc"));
