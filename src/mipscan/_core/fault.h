// Fault injection for tests (CMake option MIPSCAN_FAULT_INJECTION, off by default).
//
// In a fault-injection build, the core's hot-path allocations (scratch growth, output
// arrays, the worker pool's jobs) and thread starts call the hooks below, which fail at
// random points: fault::alloc() throws std::bad_alloc, fault::thread_start() throws
// std::system_error (what std::thread's constructor throws when the OS refuses a thread).
// The environment variable MIPSCAN_FAULTS=seed:probability[:thread_probability] (read
// once, on first use) drives them: each hook fails with that probability (thread starts
// with thread_probability when given); unset, or probabilities of 0, inject nothing. tests/test_faults.py runs
// many searches and builds under it, each in a subprocess, and checks that each one either
// completes with the right answer or raises MemoryError/RuntimeError, and never aborts.
//
// In a normal build the hooks are empty inline functions: no code, no state.
#pragma once
#include <cstddef>

#if defined(MIPSCAN_FAULT_INJECTION) && MIPSCAN_FAULT_INJECTION
#include <atomic>
#include <cerrno>
#include <cstdint>
#include <cstdlib>
#include <new>
#include <system_error>
#endif

namespace mipscan {
namespace fault {

#if defined(MIPSCAN_FAULT_INJECTION) && MIPSCAN_FAULT_INJECTION
constexpr bool kEnabled = true;

struct Config {
  uint64_t seed = 0;
  double probability = 0;
  double thread_probability = 0;
};

inline const Config& config() {
  static const Config c = [] {
    Config out;
    const char* env = std::getenv("MIPSCAN_FAULTS");
    if (env == nullptr) return out;
    char* end = nullptr;
    out.seed = std::strtoull(env, &end, 10);
    if (end != nullptr && *end == ':') out.probability = std::strtod(end + 1, &end);
    out.thread_probability = out.probability;
    if (end != nullptr && *end == ':') out.thread_probability = std::strtod(end + 1, nullptr);
    return out;
  }();
  return c;
}

// True at about `probability` of the calls: a splitmix64 hash of (seed, call number).
// Which calls fire depends on thread interleaving when several threads call; the test
// checks outcomes, not where the faults fell.
inline bool fires(double probability) {
  const Config& c = config();
  if (!(probability > 0)) return false;
  static std::atomic<uint64_t> counter{0};
  uint64_t z = c.seed * 0x9E3779B97F4A7C15ull + counter.fetch_add(1, std::memory_order_relaxed);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  z ^= z >> 31;
  return static_cast<double>(z >> 11) * 0x1.0p-53 < probability;
}

inline void alloc() {
  if (fires(config().probability)) throw std::bad_alloc();
}
inline void thread_start() {
  if (fires(config().thread_probability)) throw std::system_error(std::make_error_code(std::errc::resource_unavailable_try_again));
}
#else
constexpr bool kEnabled = false;
inline void alloc() {}
inline void thread_start() {}
#endif

}  // namespace fault

// Resizing a scratch vector (v.resize(n), v.assign(n, value)): where scratch memory is
// allocated, hence where a fault-injection build fails allocations.
template <class V>
void grow(V& v, size_t n) {
  if (n > v.capacity()) fault::alloc();
  v.resize(n);
}
template <class V, class T>
void grow_fill(V& v, size_t n, const T& value) {
  if (n > v.capacity()) fault::alloc();
  v.assign(n, value);
}

}  // namespace mipscan
