// The scalar kernels of lut16.h checked bit for bit, without Python, so the same program
// can run on another architecture (.ci/run builds it for aarch64 and runs it under qemu).
//
// Each check compares a kernel with a plain reference written here. The last one hashes
// every output of the kernels on seeded inputs and compares the hash with the value this
// program printed on x86-64: the scalar kernels are the specification, so any platform
// must reproduce them exactly (a fused multiply-add in dot_scalar, which GCC emits on
// aarch64 unless built with -ffp-contract=off, changes the hash).
//
// Output: one "PASS name" or "FAIL name: why" line per check, then "N passed, N failed";
// the exit status is 0 only when all passed.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <vector>

#include "lut16.h"
#include "topk.h"

#if MIPSCAN_HAVE_AVX2 && !(defined(__x86_64__) || defined(_M_X64))
#error "MIPSCAN_HAVE_AVX2 is set for a compiler that does not target x86-64"
#endif

namespace {

using namespace mipscan;

// Seeded inputs from splitmix64, identical on every platform (std:: distributions are not).
struct Rng {
  uint64_t s;
  uint64_t next() {
    uint64_t z = (s += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
  }
  unsigned below(unsigned m) { return static_cast<unsigned>(next() % m); }
  // A float with a full 24-bit mantissa in [-1, 1), times 2^e for e in [-6, 6]: products
  // and sums of these round, so any change of operation order or fusion shows.
  float value() {
    const float u = static_cast<float>(next() >> 40) * (1.0f / 16777216.0f);
    return std::ldexp(2.0f * u - 1.0f, static_cast<int>(below(13)) - 6);
  }
};

// FNV-1a over the bytes of everything the kernels return.
struct Hash {
  uint64_t h = 0xCBF29CE484222325ULL;
  void add(const void* p, size_t bytes) {
    const auto* b = static_cast<const unsigned char*>(p);
    for (size_t i = 0; i < bytes; ++i) h = (h ^ b[i]) * 0x100000001B3ULL;
  }
};

int g_passed = 0, g_failed = 0;

void report(const char* name, bool ok, const char* why) {
  if (ok) {
    std::printf("PASS %s\n", name);
    ++g_passed;
  } else {
    std::printf("FAIL %s: %s\n", name, why);
    ++g_failed;
  }
}

bool same_bits(float a, float b) { return std::memcmp(&a, &b, sizeof(float)) == 0; }

std::vector<uint8_t> random_codes(Rng& rng, size_t n, size_t num_blocks) {
  std::vector<uint8_t> codes(n * num_blocks);
  for (auto& c : codes) c = static_cast<uint8_t>(rng.below(16));
  return codes;
}

// Entries within lut16.h's bound lut_cap(num_blocks) = min(63, floor(65535 / num_blocks)).
std::vector<uint8_t> random_lut(Rng& rng, size_t num_blocks) {
  const unsigned bound = mipscan::lut_cap(num_blocks);
  std::vector<uint8_t> lut(num_blocks * 16);
  for (auto& v : lut) v = static_cast<uint8_t>(rng.below(bound + 1));
  return lut;
}

const size_t kSizes[][2] = {{1, 1}, {63, 2}, {64, 3}, {65, 16}, {200, 25}, {129, 256}, {70, 600}};

void check_pack_unpack(Rng& rng) {
  bool ok = true;
  for (const auto& sz : kSizes) {
    const size_t n = sz[0], nb = sz[1];
    const auto codes = random_codes(rng, n, nb);
    std::vector<uint8_t> packed(num_groups(n) * group_bytes(nb), 0xAB);
    pack_codes(codes.data(), n, nb, packed.data());
    std::vector<uint8_t> back(n * nb, 0xFF);
    unpack_codes(packed.data(), n, nb, back.data());
    ok &= back == codes;
    // Padding points of the last group hold code 0.
    const size_t padded = num_groups(n) * kGroup;
    std::vector<uint8_t> all(padded * nb, 0xFF);
    unpack_codes(packed.data(), padded, nb, all.data());
    for (size_t i = n * nb; i < all.size(); ++i) ok &= all[i] == 0;
  }
  report("pack_unpack_identity", ok, "unpack(pack(codes)) != codes, or padding not 0");
}

void check_scan(Rng& rng, Hash& hash) {
  bool ok = true;
  for (const auto& sz : kSizes) {
    const size_t n = sz[0], nb = sz[1];
    const size_t groups = num_groups(n), padded = groups * kGroup;
    auto codes = random_codes(rng, n, nb);
    codes.resize(padded * nb, 0);  // padding points score as code 0
    const auto lut = random_lut(rng, nb);
    std::vector<uint8_t> packed(groups * group_bytes(nb));
    pack_codes(codes.data(), padded, nb, packed.data());
    std::vector<uint16_t> want(padded);
    for (size_t i = 0; i < padded; ++i) {
      unsigned s = 0;
      for (size_t b = 0; b < nb; ++b) s += lut[b * 16 + codes[i * nb + b]];
      want[i] = static_cast<uint16_t>(s);
    }
    for (uint16_t cut : {uint16_t{0}, want[padded / 2], uint16_t{65535}}) {
      std::vector<uint16_t> sums(padded, 0xFFFF);
      std::vector<uint64_t> masks(groups, 0x5555);
      scan_lut16_scalar(packed.data(), groups, nb, lut.data(), cut, sums.data(), masks.data());
      ok &= sums == want;
      for (size_t i = 0; i < padded; ++i)
        ok &= ((masks[i / kGroup] >> (i % kGroup)) & 1) == (want[i] >= cut ? 1u : 0u);
      hash.add(sums.data(), sums.size() * sizeof(uint16_t));
      hash.add(masks.data(), masks.size() * sizeof(uint64_t));
    }
  }
  report("scan_lut16_scalar_vs_reference", ok, "sums or masks differ from the plain sums");
}

#if MIPSCAN_HAVE_AVX2 && (defined(__GNUC__) || defined(__clang__))
// A one-query scan kernel against the scalar one, at every size of kSizes.
bool scan_matches_scalar(Rng& rng, ScanLut16Fn fn) {
  bool ok = true;
  for (const auto& sz : kSizes) {
    const size_t n = sz[0], nb = sz[1], groups = num_groups(n);
    const auto codes = random_codes(rng, n, nb);
    const auto lut = random_lut(rng, nb);
    std::vector<uint8_t> packed(groups * group_bytes(nb));
    pack_codes(codes.data(), n, nb, packed.data());
    std::vector<uint16_t> s1(groups * kGroup), s2(groups * kGroup);
    std::vector<uint64_t> m1(groups), m2(groups);
    scan_lut16_scalar(packed.data(), groups, nb, lut.data(), 300, s1.data(), m1.data());
    fn(packed.data(), groups, nb, lut.data(), 300, s2.data(), m2.data());
    ok &= s1 == s2 && m1 == m2;
  }
  return ok;
}
#endif

// A multi-query scan kernel (lut16.h) against the one-query scalar kernel, one to
// kMultiQueries queries, each with its own table and cut.
bool multi_matches_scalar(Rng& rng, ScanLut16MultiFn fn) {
  bool ok = true;
  for (const auto& sz : kSizes) {
    const size_t n = sz[0], nb = sz[1], groups = num_groups(n), lb = lut16_double_bytes(nb);
    const auto codes = random_codes(rng, n, nb);
    std::vector<uint8_t> packed(groups * group_bytes(nb));
    pack_codes(codes.data(), n, nb, packed.data());
    for (size_t nq = 1; nq <= kMultiQueries; ++nq) {
      std::vector<std::vector<uint8_t>> luts, doubled;
      std::vector<std::vector<uint16_t>> sums(nq, std::vector<uint16_t>(groups * kGroup, 0xFFFF));
      std::vector<std::vector<uint64_t>> masks(nq, std::vector<uint64_t>(groups, 0x5555));
      const uint8_t* lp[kMultiQueries];
      uint16_t cuts[kMultiQueries];
      uint16_t* sp[kMultiQueries];
      uint64_t* mp[kMultiQueries];
      for (size_t t = 0; t < nq; ++t) {
        luts.push_back(random_lut(rng, nb));
        doubled.emplace_back(lb, 0xEE);
        lut16_double(luts[t].data(), nb, doubled[t].data());
        lp[t] = doubled[t].data();
        cuts[t] = static_cast<uint16_t>(100 * t + 200);
        sp[t] = sums[t].data();
        mp[t] = masks[t].data();
      }
      fn(packed.data(), groups, nb, nq, lp, cuts, sp, mp);
      for (size_t t = 0; t < nq; ++t) {
        std::vector<uint16_t> s1(groups * kGroup);
        std::vector<uint64_t> m1(groups);
        scan_lut16_scalar(packed.data(), groups, nb, luts[t].data(), cuts[t], s1.data(), m1.data());
        ok &= s1 == sums[t] && m1 == masks[t];
      }
    }
  }
  return ok;
}

void check_multi_scalar(Rng& rng) {
  report("scan_lut16_multi_scalar_vs_one_query", multi_matches_scalar(rng, &scan_lut16_multi_scalar),
         "a query's sums or masks differ from the one-query kernel's");
}

// The compaction kernels (topk.h) against a plain filter, at sizes around the 16-lane
// steps, with ties at the threshold and repeated bins: `fn` / `bin_fn` must keep exactly
// the reference's values, in order, and write nothing past n + kCompactSlack.
bool compaction_matches(Rng& rng, CompactGeFn fn, CompactBinFn bin_fn) {
  bool ok = true;
  for (size_t n : {0, 1, 5, 15, 16, 17, 31, 32, 33, 100, 1000, 1024}) {
    std::vector<float> s(n);
    std::vector<uint32_t> id(n);
    std::vector<uint16_t> bins(n);
    for (size_t i = 0; i < n; ++i) {
      s[i] = static_cast<float>(rng.below(9)) - 4.0f;  // many ties
      id[i] = static_cast<uint32_t>(rng.next());
      bins[i] = static_cast<uint16_t>(rng.below(4));
    }
    for (float t : {-5.0f, 0.0f, 2.0f, 5.0f}) {
      std::vector<float> ws = s, want_s;
      std::vector<uint32_t> wi = id, want_i;
      for (size_t i = 0; i < n; ++i)
        if (s[i] >= t) want_s.push_back(s[i]), want_i.push_back(id[i]);
      const size_t w = fn(ws.data(), wi.data(), n, t);
      ok &= w == want_s.size() && std::equal(want_s.begin(), want_s.end(), ws.begin()) &&
            std::equal(want_i.begin(), want_i.end(), wi.begin());
    }
    for (uint16_t b = 0; b < 5; ++b) {
      std::vector<float> want, out(n + kCompactSlack + 1, 7.0f);
      for (size_t i = 0; i < n; ++i)
        if (bins[i] == b) want.push_back(s[i]);
      const size_t w = bin_fn(s.data(), bins.data(), n, b, out.data());
      ok &= w == want.size() && std::equal(want.begin(), want.end(), out.begin()) &&
            out[n + kCompactSlack] == 7.0f;
    }
  }
  return ok;
}

// collect_group (topk.h) against the scores and admissions written out here: random
// masks, thresholds at a present score (ties decided by id) or below all, every tie rule.
bool collect_matches(Rng& rng, CollectGroupFn fn) {
  bool ok = true;
  for (int trial = 0; trial < 300; ++trial) {
    uint16_t sums[kGroup];
    for (auto& v : sums) v = static_cast<uint16_t>(rng.below(trial % 2 ? 8 : 65536));
    uint64_t mask = rng.next();
    if (trial % 5 == 0) mask &= rng.next() & rng.next();
    if (trial % 7 == 0) mask = 0;
    const float base = rng.value(), inv = std::fabs(rng.value());
    const uint32_t id0 = trial % 3 ? static_cast<uint32_t>(rng.next()) & 0x7FFFFFC0u : 0xFFFFFFC0u;
    const unsigned pick = rng.below(kGroup);
    const float thr = trial % 4 == 0 ? -INFINITY : base + static_cast<float>(sums[pick]) * inv;
    const uint64_t tid = trial % 3 == 0 ? (uint64_t{1} << 32) : uint64_t{id0} + rng.below(kGroup + 1);
    float want_s[kGroup], got_s[kGroup];
    uint32_t want_i[kGroup], got_i[kGroup];
    size_t w = 0;
    for (size_t j = 0; j < kGroup; ++j) {
      if (!((mask >> j) & 1)) continue;
      volatile float p = static_cast<float>(sums[j]) * inv;
      const float v = base + p;
      if (v > thr || (v == thr && uint64_t{id0 + j} < tid)) {
        want_s[w] = v;
        want_i[w++] = static_cast<uint32_t>(id0 + j);
      }
    }
    const size_t n = fn(sums, mask, base, inv, id0, thr, tid, got_s, got_i);
    ok &= n == w && std::memcmp(want_s, got_s, w * sizeof(float)) == 0 &&
          std::memcmp(want_i, got_i, w * sizeof(uint32_t)) == 0;
  }
  return ok;
}

// nth_of_64 (topk.h) against a sort, at every rank, with and without ties.
bool nth_matches(Rng& rng, NthOf64Fn fn) {
  bool ok = true;
  for (int trial = 0; trial < 40; ++trial) {
    float v[64], sorted[64];
    for (float& x : v) x = trial % 2 ? static_cast<float>(rng.below(6)) : rng.value();
    if (trial == 0) std::fill(v, v + 64, -INFINITY);
    std::copy(v, v + 64, sorted);
    std::sort(sorted, sorted + 64, [](float x, float y) { return x > y; });
    for (size_t rank = 0; rank < 64; ++rank) ok &= same_bits(fn(v, rank), sorted[rank]);
  }
  return ok;
}

void check_compaction_scalar(Rng& rng) {
  report("compaction_scalar_vs_filter", compaction_matches(rng, &compact_ge_scalar, &compact_bin_scalar),
         "a compaction kept other values than a plain filter");
  report("collect_group_scalar_vs_reference", collect_matches(rng, &collect_group_scalar),
         "collect_group_scalar scored or admitted other points than the reference");
  report("nth_of_64_scalar_vs_sort", nth_matches(rng, &nth_of_64_scalar),
         "nth_of_64_scalar differs from a sort");
}

// lut16.h's order: lane j % 8 takes a[j] * b[j] (rounded, then added), and the lanes
// reduce as ((l0 + l4) + (l2 + l6)) + ((l1 + l5) + (l3 + l7)). The product goes through a
// volatile so that no compiler setting can fuse it into the addition here.
float dot_reference(const float* a, const float* b, size_t d) {
  float l[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  for (size_t j = 0; j < d; ++j) {
    volatile float p = a[j] * b[j];
    l[j % 8] = l[j % 8] + p;
  }
  const float x = l[0] + l[4], y = l[2] + l[6], z = l[1] + l[5], w = l[3] + l[7];
  return (x + y) + (z + w);
}

const size_t kDims[] = {1, 2, 7, 8, 9, 16, 31, 33, 50, 100, 257};

void check_dot(Rng& rng, Hash& hash) {
  bool ok = true;
  for (size_t d : kDims) {
    for (int rep = 0; rep < 20; ++rep) {
      std::vector<float> a(d), b(d);
      for (auto& v : a) v = rng.value();
      for (auto& v : b) v = rng.value();
      const float got = dot_scalar(a.data(), b.data(), d);
      ok &= same_bits(got, dot_reference(a.data(), b.data(), d));
      hash.add(&got, sizeof(got));
    }
  }
  report("dot_scalar_vs_fixed_order_reference", ok, "dot_scalar rounds differently");
}

void check_dots(Rng& rng, Hash& hash) {
  bool ok = true;
  for (size_t d : kDims) {
    const size_t nq = 5, m = 7;
    std::vector<float> qs(nq * d), rows(m * d), out(nq * m);
    for (auto& v : qs) v = rng.value();
    for (auto& v : rows) v = rng.value();
    dots_scalar(qs.data(), nq, rows.data(), m, d, out.data());
    for (size_t i = 0; i < nq; ++i)
      for (size_t r = 0; r < m; ++r)
        ok &= same_bits(out[i * m + r], dot_reference(qs.data() + i * d, rows.data() + r * d, d));
    hash.add(out.data(), out.size() * sizeof(float));
  }
  report("dots_scalar_vs_fixed_order_reference", ok, "dots_scalar differs from dot");
}

#if MIPSCAN_HAVE_AVX2 && (defined(__GNUC__) || defined(__clang__))
// On an x86-64 CPU with AVX2 and FMA, the AVX2 kernels against the scalar ones.
void check_avx2(Rng& rng) {
  __builtin_cpu_init();
  if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma")) {
    std::printf("SKIP avx2_vs_scalar: this CPU has no AVX2+FMA\n");
    return;
  }
  bool ok = scan_matches_scalar(rng, &scan_lut16_avx2);
  ok &= multi_matches_scalar(rng, &scan_lut16_multi_avx2);
  for (size_t d : kDims) {
    const size_t nq = 6, m = 5;
    std::vector<float> qs(nq * d), rows(m * d), o1(nq * m), o2(nq * m);
    for (auto& v : qs) v = rng.value();
    for (auto& v : rows) v = rng.value();
    dots_scalar(qs.data(), nq, rows.data(), m, d, o1.data());
    dots_avx2(qs.data(), nq, rows.data(), m, d, o2.data());
    ok &= std::memcmp(o1.data(), o2.data(), o1.size() * sizeof(float)) == 0;
    for (size_t i = 0; i < nq; ++i)
      ok &= same_bits(dot_scalar(qs.data() + i * d, rows.data(), d),
                      dot_avx2(qs.data() + i * d, rows.data(), d));
  }
  report("avx2_vs_scalar", ok, "an AVX2 kernel differs from its scalar specification");
}
#endif

#if MIPSCAN_HAVE_AVX512 && (defined(__GNUC__) || defined(__clang__))
// On an x86-64 CPU with AVX-512 F/BW/VL, the AVX-512 kernels against the scalar ones.
void check_avx512(Rng& rng) {
  __builtin_cpu_init();
  if (!__builtin_cpu_supports("avx512f") || !__builtin_cpu_supports("avx512bw") ||
      !__builtin_cpu_supports("avx512vl") || !__builtin_cpu_supports("avx2")) {
    std::printf("SKIP avx512_vs_scalar: this CPU has no AVX-512 F/BW/VL\n");
    return;
  }
  bool ok = scan_matches_scalar(rng, &scan_lut16_avx512);
  ok &= multi_matches_scalar(rng, &scan_lut16_multi_avx512);
  ok &= compaction_matches(rng, &compact_ge_avx512, &compact_bin_avx512);
  ok &= collect_matches(rng, &collect_group_avx512);
  ok &= nth_matches(rng, &nth_of_64_avx512);
  if (__builtin_cpu_supports("gfni")) {  // the GFNI variants (cpu.cpp picks them when it can)
    ok &= scan_matches_scalar(rng, &scan_lut16_avx512_gfni);
    ok &= multi_matches_scalar(rng, &scan_lut16_multi_avx512_gfni);
  } else {
    std::printf("SKIP avx512_gfni: this CPU has no GFNI\n");
  }
  for (size_t d : kDims) {
    const size_t nq = 6, m = 9;
    std::vector<float> qs(nq * d), rows(m * d), o1(nq * m), o2(nq * m);
    for (auto& v : qs) v = rng.value();
    for (auto& v : rows) v = rng.value();
    dots_scalar(qs.data(), nq, rows.data(), m, d, o1.data());
    dots_avx512(qs.data(), nq, rows.data(), m, d, o2.data());
    ok &= std::memcmp(o1.data(), o2.data(), o1.size() * sizeof(float)) == 0;
    for (size_t i = 0; i < nq; ++i)
      ok &= same_bits(dot_scalar(qs.data() + i * d, rows.data(), d),
                      dot_avx512(qs.data() + i * d, rows.data(), d));
  }
  report("avx512_vs_scalar", ok, "an AVX-512 kernel differs from its scalar specification");
}
#endif

// What this program printed on x86-64 (GCC 12 and Clang 14, Debian 12).
constexpr uint64_t kExpectedHash = 0xcfc8848a4eff30bfULL;  // LUT entries <= lut_cap (63)

}  // namespace

int main() {
  Rng rng{20261130};
  Hash hash;
  check_pack_unpack(rng);
  check_scan(rng, hash);
  check_dot(rng, hash);
  check_dots(rng, hash);
  char why[96];
  std::snprintf(why, sizeof(why), "hash %016llx, expected %016llx (x86-64)",
                static_cast<unsigned long long>(hash.h),
                static_cast<unsigned long long>(kExpectedHash));
  report("outputs_match_x86_64_bit_for_bit", hash.h == kExpectedHash, why);
  Rng rng1{5};
  check_multi_scalar(rng1);
  check_compaction_scalar(rng1);
#if MIPSCAN_HAVE_AVX2 && (defined(__GNUC__) || defined(__clang__))
  Rng rng2{7};
  check_avx2(rng2);
#endif
#if MIPSCAN_HAVE_AVX512 && (defined(__GNUC__) || defined(__clang__))
  Rng rng3{11};
  check_avx512(rng3);
#endif
  std::printf("%d passed, %d failed\n", g_passed, g_failed);
  return g_failed == 0 ? 0 : 1;
}
