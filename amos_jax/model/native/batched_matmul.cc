// Strided, doubly batched single-precision matrix products for XLA:CPU (an FFI
// custom call), computed by the BLAS that SciPy ships.
//
// For every batch index (i0, i1) < (n0, n1):
//   C[i0, i1] = op(A[i0, i1]) @ op(B[i0, i1])      (m x k) @ (k x n) -> (m x n)
// where each matrix is row-major at offset i0 * s0 + i1 * s1 of its buffer with
// leading dimension ld, and op transposes it when t = 1. Attention's products read
// the heads of a (B, T, N, Dh) array in place this way: no transposed copies.
//
// XLA:CPU runs a batched dot on one core; here the batch is shared among the
// caller and the intra-op thread pool's threads, each calling a single-threaded sgemm.
#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// Fortran BLAS sgemm (column-major).
using Sgemm = void (*)(const char*, const char*, const int*, const int*, const int*,
                       const float*, const float*, const int*, const float*, const int*,
                       const float*, float*, const int*);
// OpenBLAS' openblas_set_num_threads_local: the calling thread's BLAS threads.
using SetLocalThreads = int (*)(int);

Sgemm g_sgemm = nullptr;
SetLocalThreads g_set_local_threads = nullptr;

struct Operand {
  int64_t s0, s1, ld, t;
};

// Highest element index a batch of matrices touches, plus one.
int64_t Extent(const Operand& x, int64_t n0, int64_t n1, int64_t rows, int64_t cols) {
  // Stored shape: (rows x cols), or (cols x rows) when transposed.
  int64_t r = x.t ? cols : rows, c = x.t ? rows : cols;
  return (n0 - 1) * x.s0 + (n1 - 1) * x.s1 + (r - 1) * x.ld + c;
}

// Items claimed from a shared counter; the caller waits only for claimed items, so
// a helper task the pool never runs cannot stall it.
struct Batch {
  std::atomic<int64_t> next{0};
  int64_t total = 0;
  std::mutex mu;
  std::condition_variable cv;
  int64_t done = 0;
};

ffi::Error BatchedMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> a,
                         ffi::Buffer<ffi::F32> b, ffi::ResultBuffer<ffi::F32> c,
                         int64_t n0, int64_t n1, int64_t m, int64_t n, int64_t k,
                         int64_t ta, int64_t a0, int64_t a1, int64_t lda,
                         int64_t tb, int64_t b0, int64_t b1, int64_t ldb,
                         int64_t c0, int64_t c1, int64_t ldc) {
  if (g_sgemm == nullptr) {
    return ffi::Error::Internal("amos_batched_matmul: no BLAS sgemm was set");
  }
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
  // Row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T: pass B first.
  auto item = [=](int64_t i) {
    const int64_t i0 = i / n1, i1 = i % n1;
    const char tra = ta ? 'T' : 'N', trb = tb ? 'T' : 'N';
    const int M = static_cast<int>(n), N = static_cast<int>(m), K = static_cast<int>(k);
    const int LB = static_cast<int>(ldb), LA = static_cast<int>(lda), LC = static_cast<int>(ldc);
    const float one = 1.0f, zero = 0.0f;
    g_sgemm(&trb, &tra, &M, &N, &K, &one, pb + i0 * b0 + i1 * b1, &LB,
            pa + i0 * a0 + i1 * a1, &LA, &zero, pc + i0 * c0 + i1 * c1, &LC);
  };
  const int64_t total = n0 * n1;
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), total) - 1;
  auto batch = std::make_shared<Batch>();
  batch->total = total;
  auto work = [batch, item]() {
    // One BLAS thread per worker: the parallelism is over the batch. The thread's
    // own setting is restored, for whatever else calls BLAS from it.
    const int previous = g_set_local_threads != nullptr ? g_set_local_threads(1) : 0;
    int64_t mine = 0;
    for (int64_t i; (i = batch->next.fetch_add(1)) < batch->total; ++mine) item(i);
    if (g_set_local_threads != nullptr) g_set_local_threads(previous);
    if (mine > 0) {
      std::lock_guard<std::mutex> lock(batch->mu);
      batch->done += mine;
      if (batch->done == batch->total) batch->cv.notify_all();
    }
  };
  for (int64_t h = 0; h < helpers; ++h) pool.Schedule(decltype(work)(work));
  work();
  std::unique_lock<std::mutex> lock(batch->mu);
  batch->cv.wait(lock, [&] { return batch->done == batch->total; });
  return ffi::Error::Success();
}

}  // namespace

extern "C" void amos_set_blas(void* sgemm, void* set_local_threads) {
  g_sgemm = reinterpret_cast<Sgemm>(sgemm);
  g_set_local_threads = reinterpret_cast<SetLocalThreads>(set_local_threads);
}

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
