// Work items shared among the caller and XLA:CPU's intra-op thread pool, for the
// FFI custom calls in this directory.
#ifndef AMOS_JAX_NATIVE_PARALLEL_H_
#define AMOS_JAX_NATIVE_PARALLEL_H_

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>

#include "xla/ffi/api/ffi.h"

namespace amos_native {

// Items claimed from a shared counter; the caller waits only for claimed items, so
// a helper task the pool never runs cannot stall it (and so it cannot deadlock).
struct Batch {
  std::atomic<int64_t> next{0};
  int64_t total = 0;
  std::mutex mu;
  std::condition_variable cv;
  int64_t done = 0;
};

// Runs item(i) for every i < total, on the caller and up to the pool's other threads.
template <typename Item>
void ParallelFor(xla::ffi::ThreadPool& pool, int64_t total, Item item) {
  if (total <= 0) return;
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), total) - 1;
  auto batch = std::make_shared<Batch>();
  batch->total = total;
  auto work = [batch, item]() {
    int64_t mine = 0;
    for (int64_t i; (i = batch->next.fetch_add(1)) < batch->total; ++mine) item(i);
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
}

}  // namespace amos_native

#endif  // AMOS_JAX_NATIVE_PARALLEL_H_
