// Runs fn(begin, end) over [0, n) split into contiguous chunks on up to num_threads
// std::threads (the calling thread takes the first chunk). Threads are created per call:
// there is no shared pool, so concurrent callers never contend or race on pool state.
#pragma once
#include <algorithm>
#include <atomic>
#include <cstddef>
#include <thread>
#include <vector>

namespace mipscan {

inline int hardware_threads() {
  unsigned h = std::thread::hardware_concurrency();
  return h == 0 ? 1 : static_cast<int>(h);
}

template <class Fn>
void parallel_for(size_t n, int num_threads, size_t min_chunk, Fn&& fn) {
  if (num_threads <= 0) num_threads = hardware_threads();
  size_t max_useful = min_chunk == 0 ? n : (n + min_chunk - 1) / min_chunk;
  size_t t = std::min<size_t>(static_cast<size_t>(num_threads), std::max<size_t>(max_useful, 1));
  if (t <= 1 || n == 0) {
    fn(size_t{0}, n, 0);
    return;
  }
  std::vector<std::thread> workers;
  workers.reserve(t - 1);
  size_t chunk = (n + t - 1) / t;
  for (size_t w = 1; w < t; ++w) {
    size_t b = w * chunk, e = std::min(n, b + chunk);
    if (b >= e) break;
    workers.emplace_back([&fn, b, e, w] { fn(b, e, static_cast<int>(w)); });
  }
  fn(size_t{0}, std::min(n, chunk), 0);
  for (auto& th : workers) th.join();
}

// As parallel_for, but workers pull chunks of `grain` items from a shared counter until
// none are left: fn(begin, end, worker) runs once per chunk, worker in [0, threads).
// For work whose cost per item varies (or cores that run at different speeds), where
// equal contiguous shares would leave one thread finishing alone.
template <class Fn>
void parallel_for_dynamic(size_t n, int num_threads, size_t grain, Fn&& fn) {
  if (num_threads <= 0) num_threads = hardware_threads();
  grain = std::max<size_t>(grain, 1);
  const size_t chunks = (n + grain - 1) / grain;
  const size_t t = std::min<size_t>(static_cast<size_t>(num_threads), chunks);
  if (t <= 1) {
    if (n > 0) fn(size_t{0}, n, 0);
    return;
  }
  std::atomic<size_t> next{0};
  auto work = [&](int w) {
    for (;;) {
      const size_t b = next.fetch_add(grain, std::memory_order_relaxed);
      if (b >= n) return;
      fn(b, std::min(n, b + grain), w);
    }
  };
  std::vector<std::thread> workers;
  workers.reserve(t - 1);
  for (size_t w = 1; w < t; ++w) workers.emplace_back(work, static_cast<int>(w));
  work(0);
  for (auto& th : workers) th.join();
}

}  // namespace mipscan
