// Parallel loops over one bounded, persistent worker pool shared by every caller.
//
// - The pool is created on first use and never holds more than max_pool_workers() threads
//   (hardware threads - 1, at least 1), however many threads call at once: threads are
//   started lazily, up to what the largest call so far asked for, and then live for the
//   process (the pool is deliberately never destroyed: its threads may still be waiting
//   on it while the interpreter exits). A forked child starts a fresh pool.
// - A call with num_threads = T splits its work into at most T parts. The calling thread
//   works on its own call (part 0, then it claims parts like any worker), and idle pool
//   workers help.
//   The caller never waits for a part nobody has started: if the pool is busy with other
//   callers' work, or could not start a thread, the caller runs the remaining parts itself.
//   N concurrent callers with T threads each therefore use N + max_pool_workers() threads,
//   not N x T, and no call can deadlock on the pool.
// - An exception thrown by fn in any thread (std::bad_alloc, ...) stops the call's
//   remaining work from starting, and the first one is rethrown in the calling thread
//   after every started part has finished (so fn's captures stay valid). A thread that
//   fails to start (std::system_error) only means fewer helpers. Never std::terminate.
// - Which thread runs a part never changes its result: parallel_for hands part w the w-th
//   contiguous chunk, and parallel_for_dynamic's chunks are independent by contract.
#pragma once
#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstddef>
#include <deque>
#include <exception>
#include <memory>
#include <mutex>
#include <thread>
#include <utility>

#if !defined(_WIN32)
#include <pthread.h>
#endif

#include "fault.h"

namespace mipscan {

inline int hardware_threads() {
  unsigned h = std::thread::hardware_concurrency();
  return h == 0 ? 1 : static_cast<int>(h);
}

// The pool's bound. The callers themselves make up the rest of each call's threads.
inline int max_pool_workers() { return std::max(1, hardware_threads() - 1); }

namespace detail {

// One parallel call: run(p) for every part p in [0, parts), each exactly once, on any
// thread. Shared (shared_ptr) between the caller and the workers that picked it up, so a
// worker that arrives after the call returned only finds no part left.
struct Job {
  void (*invoke)(void* body, int part) = nullptr;
  void* body = nullptr;  // the caller's functor; valid until every claimed part finished
  int parts = 0;
  std::atomic<int> next{1};        // next part to claim (part 0 is the caller's)
  std::atomic<int> unfinished{0};  // claimed or unclaimed parts not yet finished
  std::atomic<bool> failed{false};
  std::exception_ptr error;  // first exception; written under mu
  std::mutex mu;
  std::condition_variable done;

  void run(int part) noexcept {
    if (!failed.load(std::memory_order_relaxed)) {
      try {
        invoke(body, part);
      } catch (...) {
        std::lock_guard<std::mutex> lock(mu);
        if (!error) error = std::current_exception();
        failed.store(true, std::memory_order_relaxed);
      }
    }
    if (unfinished.fetch_sub(1, std::memory_order_acq_rel) == 1) {
      std::lock_guard<std::mutex> lock(mu);  // the waiter checks under mu: no lost wake-up
      done.notify_all();
    }
  }
  // Claims and runs parts until none is left.
  void participate() noexcept {
    for (;;) {
      const int p = next.fetch_add(1, std::memory_order_relaxed);
      if (p >= parts) return;
      run(p);
    }
  }
  void wait() {
    if (unfinished.load(std::memory_order_acquire) == 0) return;
    std::unique_lock<std::mutex> lock(mu);
    done.wait(lock, [this] { return unfinished.load(std::memory_order_acquire) == 0; });
  }
};

class Pool {
 public:
  // Offers the job to up to `helpers` workers, starting workers as needed (up to the
  // bound). Never throws: what cannot be started or queued, the caller does itself.
  void submit(const std::shared_ptr<Job>& job, int helpers) noexcept {
    std::unique_lock<std::mutex> lock(mu_);
    const int want = std::min(helpers, max_pool_workers());
    while (workers_ < want) {
      try {
        fault::thread_start();
        std::thread(&Pool::work, this).detach();
        ++workers_;
      } catch (...) {  // std::system_error (no more threads), std::bad_alloc
        break;
      }
    }
    helpers = std::min(helpers, workers_);
    if (helpers <= 0) return;
    try {
      queue_.emplace_back(job, helpers);
    } catch (...) {
      return;
    }
    lock.unlock();
    if (helpers == 1) {
      wake_.notify_one();
    } else {
      wake_.notify_all();
    }
  }
  // Takes the job off the queue (its parts are all claimed by now): the queue holds only
  // live calls, so it never grows beyond the number of concurrent callers.
  void retract(const Job* job) noexcept {
    std::lock_guard<std::mutex> lock(mu_);
    for (auto it = queue_.begin(); it != queue_.end(); ++it) {
      if (it->first.get() == job) {
        queue_.erase(it);
        return;
      }
    }
  }

 private:
  void work() noexcept {
#if defined(__linux__)
    pthread_setname_np(pthread_self(), "mipscan-worker");  // for top -H, gdb, perf
#endif
    for (;;) {
      std::shared_ptr<Job> job;
      {
        std::unique_lock<std::mutex> lock(mu_);
        wake_.wait(lock, [this] { return !queue_.empty(); });
        auto& front = queue_.front();
        job = front.first;
        if (--front.second == 0) queue_.pop_front();
      }
      job->participate();
    }
  }

  std::mutex mu_;
  std::condition_variable wake_;
  std::deque<std::pair<std::shared_ptr<Job>, int>> queue_;  // job, helpers still wanted
  int workers_ = 0;  // started; they never exit
};

inline std::atomic<Pool*> g_pool{nullptr};

// The process's pool, created on first use; nullptr if it cannot be allocated (the caller
// then works alone).
inline Pool* pool() noexcept {
  Pool* p = g_pool.load(std::memory_order_acquire);
  if (p != nullptr) return p;
  Pool* fresh = new (std::nothrow) Pool();
  if (fresh == nullptr) return nullptr;
  if (!g_pool.compare_exchange_strong(p, fresh, std::memory_order_acq_rel)) {
    delete fresh;
    return p;
  }
#if !defined(_WIN32)
  // A forked child has none of the parent's workers (and maybe a pool mutex that was held
  // at the fork): it abandons that pool and starts its own on first use.
  static const int registered =
      pthread_atfork(nullptr, nullptr, [] { g_pool.store(nullptr, std::memory_order_relaxed); });
  (void)registered;
#endif
  return fresh;
}

// Runs body(p) for p in [0, parts) on the caller and pool workers; rethrows the first
// exception after all started parts finished.
template <class Body>
void run_parts(int parts, Body& body) {
  if (parts <= 1) {
    if (parts == 1) body(0);
    return;
  }
  fault::alloc();
  auto job = std::make_shared<Job>();
  job->invoke = [](void* b, int p) { (*static_cast<Body*>(b))(p); };
  job->body = &body;
  job->parts = parts;
  job->unfinished.store(parts, std::memory_order_relaxed);
  Pool* p = pool();
  if (p != nullptr) p->submit(job, parts - 1);
  // Part 0 always runs on the calling thread (its per-part state, such as a search's
  // scratch, stays with one thread and warm in its cache), then whatever is left.
  job->run(0);
  job->participate();
  if (p != nullptr) p->retract(job.get());
  job->wait();
  if (job->error) std::rethrow_exception(job->error);
}

}  // namespace detail

// Runs fn(begin, end, part) over [0, n) split into up to num_threads contiguous chunks
// (num_threads <= 0: hardware_threads()), chunks of at least min_chunk items; chunk w is
// [w * chunk, min(n, (w + 1) * chunk)). With one chunk, fn(0, n, 0) runs on the caller.
template <class Fn>
void parallel_for(size_t n, int num_threads, size_t min_chunk, Fn&& fn) {
  if (num_threads <= 0) num_threads = hardware_threads();
  size_t max_useful = min_chunk == 0 ? n : (n + min_chunk - 1) / min_chunk;
  size_t t = std::min<size_t>(static_cast<size_t>(num_threads), std::max<size_t>(max_useful, 1));
  if (t <= 1 || n == 0) {
    fn(size_t{0}, n, 0);
    return;
  }
  const size_t chunk = (n + t - 1) / t;
  const size_t parts = (n + chunk - 1) / chunk;
  auto body = [&fn, n, chunk](int w) {
    const size_t b = static_cast<size_t>(w) * chunk;
    fn(b, std::min(n, b + chunk), w);
  };
  detail::run_parts(static_cast<int>(parts), body);
}

// How many parts parallel_for_dynamic uses (so callers can size per-part state).
inline size_t dynamic_parts(size_t n, int num_threads, size_t grain) {
  if (num_threads <= 0) num_threads = hardware_threads();
  grain = std::max<size_t>(grain, 1);
  return std::max<size_t>(1, std::min<size_t>(static_cast<size_t>(num_threads), (n + grain - 1) / grain));
}

// As parallel_for, but the parts pull chunks of `grain` items from a shared counter until
// none are left: fn(begin, end, part) runs once per chunk, part in [0, dynamic_parts()).
// For work whose cost per item varies (or cores that run at different speeds), where
// equal contiguous shares would leave one thread finishing alone.
template <class Fn>
void parallel_for_dynamic(size_t n, int num_threads, size_t grain, Fn&& fn) {
  grain = std::max<size_t>(grain, 1);
  const size_t t = dynamic_parts(n, num_threads, grain);
  if (t <= 1) {
    if (n > 0) fn(size_t{0}, n, 0);
    return;
  }
  std::atomic<size_t> next{0};
  std::atomic<bool> stop{false};  // a part failed: start no more chunks
  auto body = [&](int w) {
    try {
      while (!stop.load(std::memory_order_relaxed)) {
        const size_t b = next.fetch_add(grain, std::memory_order_relaxed);
        if (b >= n) return;
        fn(b, std::min(n, b + grain), w);
      }
    } catch (...) {
      stop.store(true, std::memory_order_relaxed);
      throw;
    }
  };
  detail::run_parts(static_cast<int>(t), body);
}

}  // namespace mipscan
