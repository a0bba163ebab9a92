// Unit tests of the torch-free kernels (no framework: each check prints and counts).
//   * Philox-4x32-10 against the Random123 known-answer vectors (tests/kat_vectors).
//   * The vectorised Philox batch against the scalar generator.
//   * The fused unit pass against a plain scalar loop (means, samples, column sums).
//   * Sampling frequencies against probabilities; KL and top-k against direct formulas.
//   * Adam's update and the gradients' sum of squares against a scalar loop.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <random>
#include <vector>

#include "common/philox.h"
#include "cpu/adam_cpu.h"
#include "cpu/rbm_cpu.h"
#include "cpu/sparsity_cpu.h"
#include "cpu/topk_cpu.h"

static int failures = 0;
#define CHECK(cond, ...)                                     \
  do {                                                       \
    if (!(cond)) {                                           \
      ++failures;                                            \
      std::printf("FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond); \
      std::printf(__VA_ARGS__);                              \
      std::printf("\n");                                     \
    }                                                        \
  } while (0)

using namespace aecore;

static void test_philox_kat() {
  struct Kat {
    uint32_t ctr[4], key[2], out[4];
  };
  // Random123 tests/kat_vectors, the three "philox4x32 10" lines.
  const Kat kats[] = {
      {{0, 0, 0, 0}, {0, 0}, {0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8}},
      {{0xffffffff, 0xffffffff, 0xffffffff, 0xffffffff},
       {0xffffffff, 0xffffffff},
       {0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd}},
      {{0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344},
       {0xa4093822, 0x299f31d0},
       {0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1}},
  };
  for (const Kat& k : kats) {
    const Philox4x32 r =
        philox4x32_10(k.ctr[0], k.ctr[1], k.ctr[2], k.ctr[3], k.key[0], k.key[1]);
    for (int l = 0; l < 4; ++l)
      CHECK(r.v[l] == k.out[l], "lane %d: got %08x want %08x", l, r.v[l], k.out[l]);
  }
}

using PhiloxWords = void (*)(uint32_t*, int64_t, int64_t, int64_t, uint32_t, uint32_t, uint32_t,
                            uint32_t);

// Every SIMD version of the batched generator (those this CPU runs) against the scalar one.
static void test_philox_batch() {
  std::vector<std::pair<const char*, PhiloxWords>> versions = {
      {"dispatch", cpu::detail::philox_words}, {"portable", cpu::detail::philox_words_portable}};
#ifdef AECORE_PHILOX_SIMD
  if (__builtin_cpu_supports("avx2")) versions.push_back({"avx2", cpu::detail::philox_words_avx2});
  if (__builtin_cpu_supports("avx512f"))
    versions.push_back({"avx512", cpu::detail::philox_words_avx512});
#endif
  std::printf("philox batch versions tested:");
  for (auto& v : versions) std::printf(" %s", v.first);
  std::printf("\n");
  alignas(64) uint32_t words[cpu::detail::kChunk];
  for (auto& version : versions)
  for (int64_t c0 : {0, 256, 1024}) {
    for (int64_t n : {1, 3, 4, 5, 255, 256}) {
      version.second(words, 7, c0, n, 0x12345678u, 0x9abcdef0u, 3, 11);
      for (int64_t j = 0; j < n; ++j) {
        const Philox4x32 r = philox4x32_10(static_cast<uint32_t>((c0 + j) / 4), 7, 3, 11,
                                           0x12345678u, 0x9abcdef0u);
        CHECK(words[j] == r.v[j % 4], "%s c0=%ld n=%ld j=%ld", version.first, (long)c0, (long)n,
              (long)j);
      }
    }
  }
}

static void test_uniforms() {
  CHECK(uniform01<float>(0xffffffffu) < 1.0f, "float uniform reaches 1");
  CHECK(uniform01<double>(0xffffffffu) < 1.0, "double uniform reaches 1");
  CHECK(uniform01<float>(0) == 0.0f, "float uniform of 0");
  float z0, z1;
  box_muller<float>(0, 0, z0, z1);
  CHECK(std::isfinite(z0) && std::isfinite(z1), "box-muller at u=0 not finite");
}

template <typename T>
static double sigmoid_ref(double x) {
  return 1.0 / (1.0 + std::exp(-x));
}

// The fused pass vs a scalar loop, with explicit uniforms and with Philox.
template <typename T>
static void test_unit_pass(int64_t rows, int64_t cols, bool gaussian, bool philox) {
  std::mt19937 gen(42);
  std::normal_distribution<double> nd(0.0, 2.0);
  std::uniform_real_distribution<double> ud(0.0, 1.0);
  std::vector<T> x(rows * cols), x0, bias(cols), noise(rows * cols), data(rows * cols),
      state(rows * cols);
  for (auto& e : x) e = static_cast<T>(nd(gen));
  for (auto& e : bias) e = static_cast<T>(nd(gen));
  for (auto& e : noise) e = static_cast<T>(gaussian ? nd(gen) : ud(gen));
  for (auto& e : data) e = static_cast<T>(ud(gen) < 0.5);
  x0 = x;
  const int64_t rng[2] = {0x1234567890abcdefLL, 99};
  std::vector<double> cs_mean(cols, 0.0), cs_state(cols, 0.0), cs_data(cols, 0.0);
  double sq = 0.0;
  UnitPass<T> p;
  p.x = x.data();
  p.rows = rows;
  p.cols = cols;
  p.bias = bias.data();
  p.unit = gaussian ? Unit::Gaussian : Unit::Bernoulli;
  p.sample = true;
  p.state = state.data();
  p.noise = philox ? nullptr : noise.data();
  p.rng = rng;
  p.stream = 5;
  p.colsum_mean = cs_mean.data();
  p.colsum_state = cs_state.data();
  p.data = data.data();
  p.colsum_data = cs_data.data();
  p.sq_err = &sq;
  cpu::unit_pass<T>(p);
  const double tol = sizeof(T) == 4 ? 2e-6 : 1e-12;
  std::vector<double> want_mean(cols, 0.0), want_state(cols, 0.0), want_data(cols, 0.0);
  double want_sq = 0.0;
  int64_t bad_mean = 0, bad_state = 0;
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t j = 0; j < cols; ++j) {
      const int64_t e = i * cols + j;
      const T pre = static_cast<T>(x0[e] + bias[j]);
      const double m = gaussian ? static_cast<double>(pre) : sigmoid_ref<T>(pre);
      if (std::abs(static_cast<double>(x[e]) - m) > tol * (1 + std::abs(m))) ++bad_mean;
      double s;
      if (philox) {
        const Philox4x32 r = philox4x32_10(static_cast<uint32_t>(j / 4),
                                           static_cast<uint32_t>(i), 5, 99, 0x90abcdefu,
                                           0x12345678u);
        if (gaussian) {
          T z0, z1;
          const int pair = (j % 4) / 2;
          box_muller<T>(r.v[2 * pair], r.v[2 * pair + 1], z0, z1);
          s = static_cast<double>(x[e] + ((j % 2) == 0 ? z0 : z1));
        } else {
          s = uniform01<T>(r.v[j % 4]) < x[e] ? 1.0 : 0.0;
        }
      } else {
        s = gaussian ? static_cast<double>(x[e] + noise[e]) : (noise[e] < x[e] ? 1.0 : 0.0);
      }
      if (static_cast<double>(state[e]) != s) ++bad_state;
      want_mean[j] += static_cast<double>(x[e]);
      want_state[j] += static_cast<double>(state[e]);
      want_data[j] += static_cast<double>(data[e]);
      const double d = static_cast<double>(data[e]) - static_cast<double>(x[e]);
      want_sq += d * d;
    }
  }
  CHECK(bad_mean == 0, "%ld means off (rows=%ld cols=%ld gaussian=%d)", (long)bad_mean,
        (long)rows, (long)cols, gaussian);
  CHECK(bad_state == 0, "%ld states off (rows=%ld cols=%ld gaussian=%d philox=%d)",
        (long)bad_state, (long)rows, (long)cols, gaussian, philox);
  for (int64_t j = 0; j < cols; ++j) {
    CHECK(std::abs(cs_mean[j] - want_mean[j]) < 1e-9 * (1 + rows), "colsum mean %ld", (long)j);
    CHECK(std::abs(cs_state[j] - want_state[j]) < 1e-9 * (1 + rows), "colsum state %ld",
          (long)j);
    CHECK(std::abs(cs_data[j] - want_data[j]) < 1e-9 * (1 + rows), "colsum data %ld", (long)j);
  }
  CHECK(std::abs(sq - want_sq) < 1e-9 * (1 + want_sq), "sq err %g vs %g", sq, want_sq);
}

// Sample frequencies of Philox Bernoulli draws match the probabilities.
static void test_bernoulli_frequencies() {
  const int64_t rows = 20000, cols = 8;
  std::vector<float> x(rows * cols), bias(cols, 0.0f), state(rows * cols);
  const float logits[8] = {-4.f, -2.f, -1.f, 0.f, 0.5f, 1.f, 2.f, 4.f};
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j) x[i * cols + j] = logits[j];
  const int64_t rng[2] = {2024, 7};
  std::vector<double> cs(cols, 0.0);
  UnitPass<float> p;
  p.x = x.data();
  p.rows = rows;
  p.cols = cols;
  p.bias = bias.data();
  p.state = state.data();
  p.rng = rng;
  p.colsum_state = cs.data();
  cpu::unit_pass<float>(p);
  for (int64_t j = 0; j < cols; ++j) {
    const double pj = 1.0 / (1.0 + std::exp(-logits[j]));
    const double freq = cs[j] / rows;
    const double se = std::sqrt(pj * (1 - pj) / rows);
    CHECK(std::abs(freq - pj) < 5 * se, "col %ld: freq %g vs p %g", (long)j, freq, pj);
  }
}

static void test_exp_approx() {
  double worst = 0.0;
  for (float x = -87.0f; x <= 88.0f; x += 0.0137f) {
    const double e = static_cast<double>(cpu::exp_approx(x));
    const double want = std::exp(static_cast<double>(x));
    worst = std::max(worst, std::abs(e - want) / want);
  }
  CHECK(worst < 5e-7, "exp_approx relative error %g", worst);
  CHECK(cpu::sigmoid(-200.0f) >= 0.0f && cpu::sigmoid(-200.0f) < 1e-30f, "sigmoid(-200)");
  CHECK(cpu::sigmoid(200.0f) == 1.0f, "sigmoid(200)");
}

static void test_log_approx() {
  double worst = 0.0;
  for (float x = 1e-7f; x < 1.0f; x *= 1.001f) {
    const double got = static_cast<double>(cpu::log_approx(x));
    worst = std::max(worst, std::abs(got - std::log(static_cast<double>(x))) /
                                std::max(1e-3, std::abs(std::log(static_cast<double>(x)))));
  }
  CHECK(worst < 3e-7, "log_approx relative error %g", worst);
}

template <typename T>
static void test_kl_dtype() {
  // float and double kernels agree with the double formula (float: to 1e-6 relative)
  const int64_t rows = 9, cols = 300;
  std::vector<T> h(rows * cols), mean(cols);
  std::mt19937 gen(3);
  std::uniform_real_distribution<double> ud(0.0, 1.0);
  for (auto& e : h) e = static_cast<T>(ud(gen) * ud(gen));
  for (int64_t i = 0; i < rows; ++i) {
    h[i * cols] = T(0);
    h[i * cols + 1] = T(1);
  }
  const double loss = cpu::kl_sparsity_forward<T>(h.data(), rows, cols, 0.05, 1.0, mean.data());
  double want = 0.0;
  for (int64_t j = 0; j < cols; ++j) {
    double m = 0.0;
    for (int64_t i = 0; i < rows; ++i) m += static_cast<double>(h[i * cols + j]);
    want += kl_term(0.05, m / rows);
  }
  CHECK(std::abs(loss - want) < (sizeof(T) == 4 ? 1e-6 : 1e-12) * want, "kl loss %.9g vs %.9g",
        loss, want);
}

template <typename T>
static void test_column_sums() {
  // row blocks with a tail (70 = 32 + 32 + 6 rows: the four-row adds and the single ones),
  // two column tiles, the second partial; added to what out already holds
  const int64_t rows = 70, cols = cpu::detail::kColumnTile + 37;
  std::vector<T> x(rows * cols);
  std::mt19937 gen(5);
  std::uniform_real_distribution<double> ud(-1.0, 1.0);
  for (auto& e : x) e = static_cast<T>(ud(gen));
  std::vector<double> out(cols, 1.0);
  cpu::column_sums(x.data(), rows, cols, out.data());
  for (int64_t j = 0; j < cols; ++j) {
    double want = 1.0;
    for (int64_t i = 0; i < rows; ++i) want += static_cast<double>(x[i * cols + j]);
    CHECK(std::abs(out[j] - want) < (sizeof(T) == 4 ? 1e-4 : 1e-12), "column %ld: %.9g vs %.9g",
          (long)j, out[j], want);
  }
}

static void test_kl() {
  const int64_t rows = 37, cols = 5;
  std::vector<double> h(rows * cols), mean(cols), grad(rows * cols), gmean(cols, 0.25);
  std::mt19937 gen(1);
  std::uniform_real_distribution<double> ud(0.0, 1.0);
  for (auto& e : h) e = ud(gen) * 0.3;
  for (int64_t i = 0; i < rows; ++i) h[i * cols + 4] = 0.0;  // a dead unit: clamped
  const double rho = 0.1, beta = 3.0;
  const double loss = cpu::kl_sparsity_forward<double>(h.data(), rows, cols, rho, beta,
                                                       mean.data());
  double want = 0.0;
  for (int64_t j = 0; j < cols; ++j) {
    double m = 0.0;
    for (int64_t i = 0; i < rows; ++i) m += h[i * cols + j];
    m /= rows;
    CHECK(std::abs(mean[j] - m) < 1e-14, "mean %ld", (long)j);
    const double q = std::min(std::max(m, kKlEps), 1 - kKlEps);
    want += rho * std::log(rho / q) + (1 - rho) * std::log((1 - rho) / (1 - q));
  }
  CHECK(std::abs(loss - beta * want) < 1e-10, "loss %g want %g", loss, beta * want);
  cpu::kl_sparsity_backward<double>(2.0, gmean.data(), mean.data(), rows, cols, rho, beta,
                                    grad.data());
  for (int64_t j = 0; j < cols; ++j) {
    const double m = mean[j];
    const double d = j == 4 ? 0.0 : -rho / m + (1 - rho) / (1 - m);
    const double g = (2.0 * beta * d + 0.25) / rows;
    CHECK(std::abs(grad[j] - g) < 1e-12, "grad %ld", (long)j);
  }
}

static void test_topk() {
  const int64_t rows = 3, cols = 7, k = 3;
  const float nan = std::nanf("");
  const float z[rows * cols] = {1, 5, 3, 5, 2, 0, 5,  // ties: lower indices win
                                -1, -2, nan, -3, 4, -4, 0, 9, 8, 7, 6, 5, 4, 3};
  std::vector<float> out(rows * cols), grad(rows * cols), gout(rows * cols, 1.5f);
  std::vector<int64_t> idx(rows * k);
  cpu::topk_forward<float>(z, rows, cols, k, out.data(), idx.data());
  const int64_t want[rows][k] = {{1, 3, 6}, {2, 4, 6}, {0, 1, 2}};
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t t = 0; t < k; ++t)
      CHECK(idx[i * k + t] == want[i][t], "row %ld idx %ld = %ld", (long)i, (long)t,
            (long)idx[i * k + t]);
  CHECK(out[0] == 0 && out[1] == 5 && out[2] == 0 && out[3] == 5 && out[6] == 5, "row 0 values");
  CHECK(std::isnan(out[7 + 2]) && out[7 + 4] == 4 && out[7 + 6] == 0 && out[7] == 0, "row 1");
  cpu::topk_backward<float>(gout.data(), idx.data(), rows, cols, k, grad.data());
  int kept = 0;
  for (float g : grad) kept += g == 1.5f;
  CHECK(kept == rows * k, "kept gradient entries %d", kept);
  CHECK(grad[0] == 0 && grad[1] == 1.5f, "row 0 gradient");
}

// Wide rows take the filtered path: it must agree with the heap on every row (widths
// that are and are not a multiple of the vector width, group counts that are and are not,
// float and double), on the fastest path this CPU has and on the portable one.
template <typename T>
static void test_topk_filter_vs_heap() {
  std::mt19937 gen(9);
  std::normal_distribution<float> nd;
  for (int64_t cols : {1024, 1031})
    for (int64_t k : {1, 2, 5, 16, 40}) {
      std::vector<T> z(cols);
      std::vector<int64_t> a(k), b(k), c(k);
      for (int rep = 0; rep < 20; ++rep) {
        for (auto& e : z)
          e = rep % 4 == 3 ? static_cast<T>(static_cast<int>(nd(gen) * 2)) : static_cast<T>(nd(gen));
        const bool nan = rep % 5 == 4;  // anywhere in the row: the filter must decline
        if (nan) z[(rep * 37 + k) % cols] = std::numeric_limits<T>::quiet_NaN();
        // 2k, 2k in whole vectors (what topk_forward uses) and 4k groups
        const int64_t G = rep % 3 == 0 ? 2 * k : rep % 3 == 1 ? (2 * k + 15) / 16 * 16 : 4 * k;
        cpu::detail::TopkScratch<T> s(k, G);
        const bool used = cpu::detail::topk_row_filter(z.data(), cols, k, G, s, a.data());
        const bool used_generic =
            cpu::detail::topk_row_filter_generic(z.data(), cols, k, G, s, c.data());
        cpu::detail::topk_row_heap(z.data(), cols, k, b.data());
        if (used) CHECK(a == b, "k=%ld rep=%d: filter and heap disagree", (long)k, rep);
        if (used_generic)
          CHECK(c == b, "k=%ld rep=%d: portable filter and heap disagree", (long)k, rep);
        CHECK(!(used && nan) && !(used_generic && nan), "k=%ld rep=%d: filter took a NaN row",
              (long)k, rep);
        CHECK(used || nan || rep % 4 == 3, "k=%ld rep=%d: filter declined distinct values",
              (long)k, rep);
      }
    }
}

// adam_update against the formula written out per element (double), both weight decays,
// both forms of the first moment's lerp; sum_squares against a plain double sum, across
// block and lane boundaries and thread counts.
template <typename T>
static void test_adam() {
  std::mt19937 gen(11);
  std::normal_distribution<double> nd;
  for (int64_t n : std::vector<int64_t>{1, 15, 16, 17, 1000, (1 << 16) + 3, (1 << 18) + 5}) {
    std::vector<T> x(n);
    double want = 0.0;
    for (auto& e : x) {
      e = static_cast<T>(nd(gen));
      want += static_cast<double>(e) * static_cast<double>(e);
    }
    const double got = cpu::sum_squares<T>(x.data(), n);
    CHECK(std::fabs(got - want) <= 1e-12 * want, "n=%ld: sum of squares %.17g, want %.17g",
          (long)n, got, want);
  }
  for (bool decoupled : {false, true})
    for (double beta1 : {0.9, 0.0}) {
      const int64_t n = 1037;
      const double lr = 0.01, beta2 = 0.99, eps = 1e-6, wd = 0.05, scale = 0.5, t = 3.0;
      std::vector<T> p(n), m(n), v(n), g(n);
      for (int64_t i = 0; i < n; ++i) {
        p[i] = static_cast<T>(nd(gen));
        m[i] = static_cast<T>(nd(gen) * 0.1);
        v[i] = static_cast<T>(std::fabs(nd(gen)) * 0.01);
        g[i] = static_cast<T>(nd(gen));
      }
      std::vector<T> p0 = p, m0 = m, v0 = v;
      cpu::AdamCoefs<T> c;
      c.weight1 = static_cast<T>(1.0 - beta1);
      c.beta2 = static_cast<T>(beta2);
      c.weight2 = static_cast<T>(1.0 - beta2);
      c.eps = static_cast<T>(eps);
      c.step_size = static_cast<T>(lr / (1.0 - std::pow(beta1, t)));
      c.bc2_sqrt = static_cast<T>(std::sqrt(1.0 - std::pow(beta2, t)));
      c.grad_scale = static_cast<T>(scale);
      c.decay = static_cast<T>(decoupled ? 1.0 - lr * wd : wd);
      c.decoupled = decoupled;
      c.has_decay = true;
      cpu::adam_update<T>(p.data(), m.data(), v.data(), g.data(), n, c);
      const double tol = sizeof(T) == 4 ? 1e-5 : 1e-12;
      int bad = 0;
      for (int64_t i = 0; i < n; ++i) {
        double gi = static_cast<double>(g[i]) * scale, pi = p0[i];
        if (decoupled) {
          pi *= 1.0 - lr * wd;
        } else {
          gi += wd * pi;
        }
        const double mi = beta1 * m0[i] + (1.0 - beta1) * gi;
        const double vi = beta2 * v0[i] + (1.0 - beta2) * gi * gi;
        const double step = lr / (1.0 - std::pow(beta1, t));
        const double pw = pi - step * mi / (std::sqrt(vi) / std::sqrt(1.0 - std::pow(beta2, t)) + eps);
        bad += std::fabs(p[i] - pw) > tol * (1.0 + std::fabs(pw)) ||
               std::fabs(m[i] - mi) > tol * (1.0 + std::fabs(mi)) ||
               std::fabs(v[i] - vi) > tol * (1.0 + std::fabs(vi));
      }
      CHECK(bad == 0, "decoupled=%d beta1=%g: %d of %ld elements off the formula",
            (int)decoupled, beta1, bad, (long)n);
      if (beta1 == 0.0) {  // torch's lerp from the nearer end: the moment is g itself
        for (int64_t i = 0; i < n && !decoupled; ++i) bad += m[i] != static_cast<T>(
            static_cast<T>(g[i] * c.grad_scale) + c.decay * p0[i]);
        CHECK(bad == 0, "beta1=0: %d first moments are not the gradient", bad);
      }
    }
}

int main() {
  test_philox_kat();
  test_philox_batch();
  test_uniforms();
  test_exp_approx();
  for (bool gaussian : {false, true})
    for (bool philox : {false, true}) {
      test_unit_pass<float>(1, 1, gaussian, philox);
      test_unit_pass<float>(3, 7, gaussian, philox);
      test_unit_pass<float>(129, 301, gaussian, philox);  // > 1 chunk, threaded
      test_unit_pass<double>(65, 517, gaussian, philox);
    }
  test_bernoulli_frequencies();
  test_log_approx();
  test_kl_dtype<float>();
  test_kl_dtype<double>();
  test_column_sums<float>();
  test_column_sums<double>();
  test_kl();
  test_topk();
  test_topk_filter_vs_heap<float>();
  test_topk_filter_vs_heap<double>();
  test_adam<float>();
  test_adam<double>();
  if (failures) {
    std::printf("%d check(s) failed\n", failures);
    return 1;
  }
  std::printf("all kernel tests passed\n");
  return 0;
}
