#include "lda_engine.h"

#include <algorithm>
#include <cmath>
#include <exception>
#include <mutex>
#include <numeric>
#include <thread>
#include <utility>

namespace doe_lda {
namespace {

uint64_t splitmix64(uint64_t& x) {
  uint64_t z = (x += 0x9e3779b97f4a7c15ULL);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

// xoshiro256**: small, fast, and the same stream on every platform (std:: distributions are not).
class Rng {
 public:
  Rng(uint64_t seed, uint64_t stream, uint64_t thread) {
    uint64_t x = seed;
    uint64_t a = splitmix64(x);
    x = a ^ (stream * 0xd1b54a32d192ed03ULL);
    uint64_t b = splitmix64(x);
    x = b ^ (thread * 0x8cb92ba72f3d8dd7ULL);
    for (auto& v : s_) v = splitmix64(x);
  }
  uint64_t next() {
    const uint64_t result = rotl(s_[1] * 5, 7) * 9;
    const uint64_t t = s_[1] << 17;
    s_[2] ^= s_[0];
    s_[3] ^= s_[1];
    s_[1] ^= s_[2];
    s_[0] ^= s_[3];
    s_[2] ^= t;
    s_[3] = rotl(s_[3], 45);
    return result;
  }
  float uniform() { return static_cast<float>(next() >> 40) * 0x1.0p-24f; }  // [0, 1)
  uint32_t below(uint32_t n) { return static_cast<uint32_t>(((next() >> 32) * n) >> 32); }

 private:
  static uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }
  uint64_t s_[4];
};

// Runs f(t) for t in [0, threads) on threads (t == 0 on the caller) and rethrows the first error.
template <class F>
void run_threads(int threads, F&& f) {
  if (threads <= 1) {
    f(0);
    return;
  }
  std::exception_ptr error;
  std::mutex mu;
  auto guarded = [&](int t) {
    try {
      f(t);
    } catch (...) {
      std::lock_guard<std::mutex> lock(mu);
      if (!error) error = std::current_exception();
    }
  };
  std::vector<std::thread> pool;
  pool.reserve(threads - 1);
  for (int t = 1; t < threads; ++t) pool.emplace_back(guarded, t);
  guarded(0);
  for (auto& th : pool) th.join();
  if (error) std::rethrow_exception(error);
}

// Eight independent partial sums: vectorizes at -O3 without -ffast-math, and the summation order
// (hence the result, bit for bit) is fixed by the code, not by the compiler.
inline float dot(const float* a, const float* b, int n) {
  float s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int k = 0;
  for (; k + 8 <= n; k += 8)
    for (int j = 0; j < 8; ++j) s[j] += a[k + j] * b[k + j];
  for (; k < n; ++k) s[k & 7] += a[k] * b[k];
  return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
}

inline float sum(const float* a, int n) {
  float s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int k = 0;
  for (; k + 8 <= n; k += 8)
    for (int j = 0; j < 8; ++j) s[j] += a[k + j];
  for (; k < n; ++k) s[k & 7] += a[k];
  return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
}

int argmax(const float* a, int n) {
  int best = 0;
  for (int k = 1; k < n; ++k)
    if (a[k] > a[best]) best = k;
  return best;
}

void check_topics(int k) {
  if (k < 1 || k > 32767)
    throw std::invalid_argument("num_topics must be in [1, 32767] (topic ids are int16), got " +
                                std::to_string(k));
}

// The kept words of one document as (word, count), sorted by word: inference touches each distinct
// word once per iteration instead of once per token.
void bag_of_words(const uint32_t* toks, int64_t n, const uint8_t* keep, int64_t stride, int64_t start,
                  std::vector<uint32_t>& scratch, std::vector<std::pair<uint32_t, float>>& bag) {
  scratch.clear();
  for (int64_t i = start; i < n; i += stride)
    if (keep[toks[i]]) scratch.push_back(toks[i]);
  std::sort(scratch.begin(), scratch.end());
  bag.clear();
  for (size_t i = 0; i < scratch.size();) {
    size_t j = i;
    while (j < scratch.size() && scratch[j] == scratch[i]) ++j;
    bag.emplace_back(scratch[i], static_cast<float>(j - i));
    i = j;
  }
}

// EM fixed point of theta for one bag of words against a fixed phi (see `infer` in the header).
void estimate_theta(const std::vector<std::pair<uint32_t, float>>& bag, const float* phi, int K,
                    float alpha, int max_iterations, float tolerance, float* theta, float* acc,
                    float* tmp) {
  std::fill(theta, theta + K, 1.0f / K);
  if (bag.empty()) return;
  for (int it = 0; it < max_iterations; ++it) {
    std::fill(acc, acc + K, alpha);
    for (const auto& [w, c] : bag) {
      const float* row = phi + static_cast<int64_t>(w) * K;
      for (int k = 0; k < K; ++k) tmp[k] = theta[k] * row[k];
      const float s = sum(tmp, K);
      if (!(s > 0)) continue;
      const float scale = c / s;
      for (int k = 0; k < K; ++k) acc[k] += scale * tmp[k];
    }
    const float inv = 1.0f / sum(acc, K);
    float delta = 0;
    for (int k = 0; k < K; ++k) {
      const float t = acc[k] * inv;
      delta += std::fabs(t - theta[k]);
      theta[k] = t;
    }
    if (delta < tolerance) break;
  }
}

}  // namespace

void validate_corpus(const CorpusView& corpus, int64_t vocab_size) {
  if (corpus.num_docs < 0) throw std::invalid_argument("negative document count");
  if (corpus.num_docs == 0) return;
  if (corpus.offsets[0] < 0)
    throw std::invalid_argument("document offsets start below 0 (" +
                                std::to_string(corpus.offsets[0]) + ")");
  for (int64_t d = 0; d < corpus.num_docs; ++d) {
    if (corpus.offsets[d + 1] < corpus.offsets[d])
      throw std::invalid_argument("document offsets decrease at document " + std::to_string(d));
    const uint32_t* t = corpus.doc_begin(d);
    for (int64_t i = 0, n = corpus.doc_length(d); i < n; ++i)
      if (static_cast<int64_t>(t[i]) >= vocab_size)
        throw std::invalid_argument("token id " + std::to_string(t[i]) + " >= vocab size " +
                                    std::to_string(vocab_size) + " at token " +
                                    std::to_string(corpus.offsets[d] + i) + " (document " +
                                    std::to_string(d) + ")");
  }
}

std::vector<int64_t> partition_docs(const CorpusView& corpus, int parts) {
  parts = std::max(parts, 1);
  std::vector<int64_t> bounds(parts + 1, corpus.num_docs);
  bounds[0] = 0;
  const int64_t base = corpus.num_docs ? corpus.offsets[0] : 0;
  const int64_t total = corpus.num_tokens();
  int64_t d = 0;
  for (int p = 1; p < parts; ++p) {
    const int64_t target = base + total * p / parts;
    while (d < corpus.num_docs && corpus.offsets[d] < target) ++d;
    bounds[p] = std::max(d, bounds[p - 1]);
  }
  return bounds;
}

void count_words(const CorpusView& corpus, int64_t vocab_size, int threads, int64_t* counts,
                 int64_t* doc_freq) {
  validate_corpus(corpus, vocab_size);
  threads = std::max(threads, 1);
  const auto parts = partition_docs(corpus, threads);
  std::vector<std::vector<int64_t>> c(threads), df(threads), last(threads);
  run_threads(threads, [&](int t) {
    c[t].assign(vocab_size, 0);
    df[t].assign(vocab_size, 0);
    last[t].assign(vocab_size, -1);
    for (int64_t d = parts[t]; d < parts[t + 1]; ++d) {
      const uint32_t* tok = corpus.doc_begin(d);
      for (int64_t i = 0, n = corpus.doc_length(d); i < n; ++i) {
        const uint32_t w = tok[i];
        ++c[t][w];
        if (last[t][w] != d) {
          last[t][w] = d;
          ++df[t][w];
        }
      }
    }
  });
  for (int64_t w = 0; w < vocab_size; ++w) {
    int64_t cw = 0, dw = 0;
    for (int t = 0; t < threads; ++t) {
      cw += c[t][w];
      dw += df[t][w];
    }
    counts[w] = cw;
    doc_freq[w] = dw;
  }
}

GibbsSampler::GibbsSampler(const GibbsConfig& config, const CorpusView& corpus, const uint8_t* keep,
                           int16_t* z)
    : cfg_(config), corpus_(corpus), keep_(keep), z_(z) {
  check_topics(cfg_.num_topics);
  if (cfg_.vocab_size <= 0) throw std::invalid_argument("vocab_size must be positive");
  if (!(cfg_.alpha > 0) || !(cfg_.beta > 0))
    throw std::invalid_argument("alpha and beta must be positive");
  if (cfg_.mh_steps < 1) throw std::invalid_argument("mh_steps must be >= 1");
  cfg_.threads = std::max(cfg_.threads, 1);
  validate_corpus(corpus_, cfg_.vocab_size);
  for (int64_t w = 0; w < cfg_.vocab_size; ++w) kept_vocab_ += keep_[w] ? 1 : 0;
  if (kept_vocab_ == 0) throw std::invalid_argument("the vocabulary mask keeps no word");
  parts_ = partition_docs(corpus_, cfg_.threads);
  nwk_.assign(cfg_.vocab_size * cfg_.num_topics, 0);
  nk_.assign(cfg_.num_topics, 0);
  if (cfg_.threads > 1) {
    local_nwk_.resize(cfg_.threads);
    local_nk_.resize(cfg_.threads);
  }
}

void GibbsSampler::initialize() {
  const int K = cfg_.num_topics;
  run_threads(cfg_.threads, [&](int t) {
    Rng rng(cfg_.seed, 0, t);
    for (int64_t d = parts_[t]; d < parts_[t + 1]; ++d) {
      const uint32_t* tok = corpus_.doc_begin(d);
      int16_t* z = z_ + (corpus_.offsets[d] - corpus_.offsets[0]);
      for (int64_t i = 0, n = corpus_.doc_length(d); i < n; ++i)
        z[i] = keep_[tok[i]] ? static_cast<int16_t>(rng.below(K)) : int16_t(-1);
    }
  });
  sweeps_ = 0;
  rebuild_counts();
}

void GibbsSampler::rebuild_counts() {
  const int K = cfg_.num_topics;
  const int T = cfg_.threads;
  std::vector<std::vector<int32_t>> part_nwk(T);
  std::vector<int64_t> part_kept(T, 0);
  run_threads(T, [&](int t) {
    part_nwk[t].assign(nwk_.size(), 0);
    for (int64_t d = parts_[t]; d < parts_[t + 1]; ++d) {
      const uint32_t* tok = corpus_.doc_begin(d);
      const int16_t* z = z_ + (corpus_.offsets[d] - corpus_.offsets[0]);
      for (int64_t i = 0, n = corpus_.doc_length(d); i < n; ++i) {
        if (!keep_[tok[i]]) {
          // The sweep tells excluded tokens by z == -1, so z and the mask must agree.
          if (z[i] != -1)
            throw std::invalid_argument("token " + std::to_string(corpus_.offsets[d] + i) +
                                        " is outside the vocabulary mask but has topic " +
                                        std::to_string(z[i]) + " (expected -1)");
          continue;
        }
        if (z[i] < 0 || z[i] >= K)
          throw std::invalid_argument("topic assignment " + std::to_string(z[i]) +
                                      " out of range at token " +
                                      std::to_string(corpus_.offsets[d] + i));
        ++part_nwk[t][static_cast<int64_t>(tok[i]) * K + z[i]];
        ++part_kept[t];
      }
    }
  });
  std::fill(nk_.begin(), nk_.end(), 0);
  kept_tokens_ = 0;
  for (int t = 0; t < T; ++t) kept_tokens_ += part_kept[t];
  for (size_t i = 0; i < nwk_.size(); ++i) {
    int64_t s = 0;
    for (int t = 0; t < T; ++t) s += part_nwk[t][i];
    nwk_[i] = static_cast<int32_t>(s);
    nk_[i % K] += s;
  }
}

void GibbsSampler::build_alias_tables() {
  const int K = cfg_.num_topics;
  const int64_t V = cfg_.vocab_size;
  alias_.resize(V * K);
  alias_mass_.assign(V, 0.0f);
  const double vbeta = kept_vocab_ * cfg_.beta;
  std::vector<double> inv(K);
  for (int k = 0; k < K; ++k) inv[k] = 1.0 / (nk_[k] + vbeta);
  const auto T = cfg_.threads;
  run_threads(T, [&](int t) {
    std::vector<double> q(K);
    std::vector<int> small, large;
    small.reserve(K);
    large.reserve(K);
    for (int64_t w = V * t / T; w < V * (t + 1) / T; ++w) {
      if (!keep_[w]) continue;
      const int32_t* row = nwk_.data() + w * K;
      double total = 0;
      AliasSlot* table = alias_.data() + w * K;
      for (int k = 0; k < K; ++k) {
        total += q[k] = (row[k] + cfg_.beta) * inv[k];
        table[k].q = static_cast<float>(cfg_.alpha * q[k]);
      }
      alias_mass_[w] = static_cast<float>(cfg_.alpha * total);
      // Vose's alias method: one uniform slot, then the slot's own topic or its alias.
      small.clear();
      large.clear();
      for (int k = 0; k < K; ++k) {
        q[k] *= K / total;
        (q[k] < 1.0 ? small : large).push_back(k);
      }
      while (!small.empty() && !large.empty()) {
        const int s = small.back(), l = large.back();
        small.pop_back();
        table[s].prob = static_cast<float>(q[s]);
        table[s].alias = l;
        q[l] -= 1.0 - q[s];
        if (q[l] < 1.0) {
          large.pop_back();
          small.push_back(l);
        }
      }
      for (int k : large) table[k].prob = 1.0f, table[k].alias = k;
      for (int k : small) table[k].prob = 1.0f, table[k].alias = k;
    }
  });
}

void GibbsSampler::sweep() {
  const int T = cfg_.threads;
  // Both samplers read the counts as they were at the start of the sweep: the dense one in other
  // threads' documents (AD-LDA), the alias one also through its word proposal.
  if (cfg_.sampler == SamplerKind::kAliasMH) build_alias_tables();
  ++sweeps_;
  if (T == 1) {
    sweep_range(0, parts_[0], parts_[1], nwk_.data(), nk_.data());
    return;
  }
  run_threads(T, [&](int t) {
    local_nwk_[t] = nwk_;
    local_nk_[t] = nk_;
    sweep_range(t, parts_[t], parts_[t + 1], local_nwk_[t].data(), local_nk_[t].data());
  });
  // global += sum_t (local_t - global), summed in thread order: deterministic.
  const int64_t n = static_cast<int64_t>(nwk_.size());
  run_threads(T, [&](int t) {
    for (int64_t i = n * t / T; i < n * (t + 1) / T; ++i) {
      int64_t v = nwk_[i];
      for (int u = 0; u < T; ++u) v += local_nwk_[u][i] - nwk_[i];
      nwk_[i] = static_cast<int32_t>(v);
    }
  });
  for (int k = 0; k < cfg_.num_topics; ++k) {
    int64_t v = nk_[k];
    for (int u = 0; u < T; ++u) v += local_nk_[u][k] - nk_[k];
    nk_[k] = v;
  }
}

void GibbsSampler::sweep_range(int thread, int64_t doc_lo, int64_t doc_hi, int32_t* nwk, int64_t* nk) {
  const int K = cfg_.num_topics;
  const float alpha = static_cast<float>(cfg_.alpha);
  const float beta = static_cast<float>(cfg_.beta);
  const float vbeta = static_cast<float>(kept_vocab_ * cfg_.beta);
  Rng rng(cfg_.seed, static_cast<uint64_t>(sweeps_), static_cast<uint64_t>(thread));
  const bool dense = cfg_.sampler == SamplerKind::kDense;
  std::vector<int32_t> ndk(K, 0);
  std::vector<float> inv_denom(K), p(K);
  for (int k = 0; k < K; ++k) inv_denom[k] = 1.0f / (nk[k] + vbeta);
  // Sparse-alias sampler state: the document's non-zero topics and each one's slot in that list.
  std::vector<int16_t> nz, slot(K, -1);
  nz.reserve(K);

  auto add_topic = [&](int k) {
    if (ndk[k]++ == 0) {
      slot[k] = static_cast<int16_t>(nz.size());
      nz.push_back(static_cast<int16_t>(k));
    }
  };
  auto remove_topic = [&](int k) {
    if (--ndk[k] == 0) {
      const int16_t last = nz.back();
      nz[slot[k]] = last;
      slot[last] = slot[k];
      nz.pop_back();
      slot[k] = -1;
    }
  };

  for (int64_t d = doc_lo; d < doc_hi; ++d) {
    const uint32_t* tok = corpus_.doc_begin(d);
    int16_t* z = z_ + (corpus_.offsets[d] - corpus_.offsets[0]);
    const int64_t n = corpus_.doc_length(d);
    for (int64_t i = 0; i < n; ++i)
      if (z[i] >= 0) add_topic(z[i]);
    for (int64_t i = 0; i < n; ++i) {
      if (z[i] < 0) continue;
      const uint32_t w = tok[i];
      int32_t* row = nwk + static_cast<int64_t>(w) * K;
      const int s = z[i];
      remove_topic(s);
      --row[s];
      --nk[s];
      inv_denom[s] = 1.0f / (nk[s] + vbeta);
      int t_new;
      if (dense) {
        for (int k = 0; k < K; ++k) p[k] = (ndk[k] + alpha) * (row[k] + beta) * inv_denom[k];
        const float u = rng.uniform() * sum(p.data(), K);
        float c = 0;
        t_new = K - 1;
        for (int k = 0; k < K; ++k) {
          c += p[k];
          if (u < c) {
            t_new = k;
            break;
          }
        }
      } else {
        // Target p(k) ∝ (n_dk + alpha)(n_wk + beta)/(n_k + V beta), split as
        //   n_dk (n_wk + beta)/(n_k + V beta)   over the document's few topics: exact, live counts;
        // + alpha (n_wk + beta)/(n_k + V beta)  dense in k: drawn from the word's alias table built
        //                                         from the sweep-start counts (AliasLDA, Li et al. 2014).
        // The mixture is the MH proposal; accepting by p/q corrects for the stale word part.
        const int16_t* topics = nz.data();
        const int m = static_cast<int>(nz.size());
        float doc_mass = 0;
        for (int j = 0; j < m; ++j) {
          const int k = topics[j];
          doc_mass += p[j] = ndk[k] * (row[k] + beta) * inv_denom[k];
        }
        const float word_mass = alias_mass_[w];
        const AliasSlot* table = alias_.data() + static_cast<int64_t>(w) * K;
        auto target = [&](int k) { return (ndk[k] + alpha) * (row[k] + beta) * inv_denom[k]; };
        auto proposal = [&](int k) { return ndk[k] * (row[k] + beta) * inv_denom[k] + table[k].q; };
        int cur = s;
        float p_cur = target(cur), q_cur = proposal(cur);
        for (int step = 0; step < cfg_.mh_steps; ++step) {
          float u = rng.uniform() * (doc_mass + word_mass);
          int t;
          if (u < doc_mass) {
            int j = 0;
            while (j < m - 1 && u >= p[j]) u -= p[j++];
            t = topics[j];
          } else {
            const AliasSlot& a = table[rng.below(K)];
            t = rng.uniform() < a.prob ? static_cast<int>(&a - table) : a.alias;
          }
          if (t == cur) continue;
          const float p_t = target(t), q_t = proposal(t);
          const float a = p_t * q_cur / (p_cur * q_t);
          if (a >= 1.0f || rng.uniform() < a) cur = t, p_cur = p_t, q_cur = q_t;
        }
        t_new = cur;
      }
      add_topic(t_new);
      ++row[t_new];
      ++nk[t_new];
      inv_denom[t_new] = 1.0f / (nk[t_new] + vbeta);
      z[i] = static_cast<int16_t>(t_new);
    }
    for (int16_t k : nz) ndk[k] = 0, slot[k] = -1;
    nz.clear();
  }
}

double GibbsSampler::log_joint() const {
  const int K = cfg_.num_topics;
  const double a = cfg_.alpha, b = cfg_.beta, vb = kept_vocab_ * b;
  double ll = K * (std::lgamma(vb) - kept_vocab_ * std::lgamma(b));
  for (int64_t w = 0; w < cfg_.vocab_size; ++w) {
    if (!keep_[w]) continue;
    for (int k = 0; k < K; ++k) ll += std::lgamma(nwk_[w * K + k] + b);
  }
  for (int k = 0; k < K; ++k) ll -= std::lgamma(nk_[k] + vb);
  std::vector<int64_t> ndk(K);
  const double doc_const = std::lgamma(K * a) - K * std::lgamma(a);
  for (int64_t d = 0; d < corpus_.num_docs; ++d) {
    std::fill(ndk.begin(), ndk.end(), 0);
    const int16_t* z = z_ + (corpus_.offsets[d] - corpus_.offsets[0]);
    int64_t nd = 0;
    for (int64_t i = 0, n = corpus_.doc_length(d); i < n; ++i)
      if (z[i] >= 0) ++ndk[z[i]], ++nd;
    ll += doc_const - std::lgamma(nd + K * a);
    for (int k = 0; k < K; ++k) ll += std::lgamma(ndk[k] + a);
  }
  return ll;
}

std::vector<float> topic_word_from_counts(const int32_t* nwk, const int64_t* nk, int64_t vocab_size,
                                          int num_topics, const uint8_t* keep, double beta) {
  check_topics(num_topics);
  int64_t kept = 0;
  for (int64_t w = 0; w < vocab_size; ++w) kept += keep[w] ? 1 : 0;
  std::vector<double> inv(num_topics);
  for (int k = 0; k < num_topics; ++k) inv[k] = 1.0 / (nk[k] + kept * beta);
  std::vector<float> phi(vocab_size * num_topics, 0.0f);
  for (int64_t w = 0; w < vocab_size; ++w) {
    if (!keep[w]) continue;
    for (int k = 0; k < num_topics; ++k)
      phi[w * num_topics + k] = static_cast<float>((nwk[w * num_topics + k] + beta) * inv[k]);
  }
  return phi;
}

void infer(const InferConfig& cfg, const CorpusView& corpus, const float* phi, const uint8_t* keep,
           float* theta_out, int16_t* topic_out) {
  const int K = cfg.num_topics;
  check_topics(K);
  validate_corpus(corpus, cfg.vocab_size);
  const int T = std::max(cfg.threads, 1);
  const auto parts = partition_docs(corpus, T);
  run_threads(T, [&](int t) {
    std::vector<uint32_t> scratch;
    std::vector<std::pair<uint32_t, float>> bag;
    std::vector<float> acc(K), tmp(K);
    for (int64_t d = parts[t]; d < parts[t + 1]; ++d) {
      const uint32_t* tok = corpus.doc_begin(d);
      const int64_t n = corpus.doc_length(d);
      float* theta = theta_out + d * K;
      bag_of_words(tok, n, keep, 1, 0, scratch, bag);
      estimate_theta(bag, phi, K, static_cast<float>(cfg.alpha), cfg.max_iterations,
                     static_cast<float>(cfg.tolerance), theta, acc.data(), tmp.data());
      if (!topic_out) continue;
      int16_t* out = topic_out + (corpus.offsets[d] - corpus.offsets[0]);
      // A document without any in-vocabulary token has no dominant topic: its tokens get -1.
      const int16_t fallback =
          (cfg.ignore_unlabeled || bag.empty()) ? int16_t(-1) : static_cast<int16_t>(argmax(theta, K));
      for (int64_t i = 0; i < n; ++i) {
        if (!keep[tok[i]]) {
          out[i] = fallback;
          continue;
        }
        const float* row = phi + static_cast<int64_t>(tok[i]) * K;
        for (int k = 0; k < K; ++k) tmp[k] = theta[k] * row[k];
        out[i] = static_cast<int16_t>(argmax(tmp.data(), K));
      }
    }
  });
}

std::pair<double, int64_t> doc_completion_loglik(const InferConfig& cfg, const CorpusView& corpus,
                                                 const float* phi, const uint8_t* keep) {
  const int K = cfg.num_topics;
  check_topics(K);
  validate_corpus(corpus, cfg.vocab_size);
  const int T = std::max(cfg.threads, 1);
  const auto parts = partition_docs(corpus, T);
  std::vector<double> ll(T, 0.0);
  std::vector<int64_t> count(T, 0);
  run_threads(T, [&](int t) {
    std::vector<uint32_t> scratch, kept;
    std::vector<std::pair<uint32_t, float>> bag;
    std::vector<float> theta(K), acc(K), tmp(K);
    for (int64_t d = parts[t]; d < parts[t + 1]; ++d) {
      const uint32_t* tok = corpus.doc_begin(d);
      kept.clear();
      for (int64_t i = 0, n = corpus.doc_length(d); i < n; ++i)
        if (keep[tok[i]]) kept.push_back(tok[i]);
      if (kept.size() < 2) continue;
      // Even positions estimate theta; odd positions are scored.
      bag_of_words(kept.data(), static_cast<int64_t>(kept.size()), keep, 2, 0, scratch, bag);
      estimate_theta(bag, phi, K, static_cast<float>(cfg.alpha), cfg.max_iterations,
                     static_cast<float>(cfg.tolerance), theta.data(), acc.data(), tmp.data());
      for (size_t i = 1; i < kept.size(); i += 2) {
        const float p = dot(theta.data(), phi + static_cast<int64_t>(kept[i]) * K, K);
        ll[t] += std::log(static_cast<double>(p));
        ++count[t];
      }
    }
  });
  double total = 0;
  int64_t n = 0;
  for (int t = 0; t < T; ++t) total += ll[t], n += count[t];
  return {total, n};
}

}  // namespace doe_lda
