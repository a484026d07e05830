// Stage-1 LDA engine (DoE §3.2, App. A.2): collapsed Gibbs sampling, inference of theta against a
// fixed topic-word matrix, and per-token topic labelling. Plain C++17, no torch and no Python: the
// pybind11 bindings (bindings.cpp) and the GoogleTest tests (test_lda_engine.cpp) sit on top.
//
// Corpus layout (CONTRACT §5): token ids concatenated (uint32) and CSR document offsets (int64,
// D + 1 entries). `tokens` points at the token of offset `offsets[0]`, so a caller can hand in a
// slice of a memory-mapped corpus without copying it.
#pragma once

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace doe_lda {

struct CorpusView {
  const uint32_t* tokens = nullptr;
  const int64_t* offsets = nullptr;  // num_docs + 1 entries, non-decreasing
  int64_t num_docs = 0;

  int64_t num_tokens() const { return num_docs ? offsets[num_docs] - offsets[0] : 0; }
  const uint32_t* doc_begin(int64_t d) const { return tokens + (offsets[d] - offsets[0]); }
  int64_t doc_length(int64_t d) const { return offsets[d + 1] - offsets[d]; }
};

// Throws std::invalid_argument if offsets are not a valid CSR index or a token id is >= vocab_size;
// the message names the document and the position so the caller can point at the bad shard.
void validate_corpus(const CorpusView& corpus, int64_t vocab_size);

// Split documents [0, num_docs) into `parts` contiguous ranges of about equal token counts.
// The split only depends on the offsets, so a fixed thread count gives a fixed partition.
std::vector<int64_t> partition_docs(const CorpusView& corpus, int parts);

// Token counts and document frequencies of every word id (vocabulary filtering, coherence).
void count_words(const CorpusView& corpus, int64_t vocab_size, int threads, int64_t* counts,
                 int64_t* doc_freq);

// kDense: the exact conditional, O(K) a token. kAliasMH: sparse + alias Metropolis-Hastings
// (AliasLDA, Li et al. 2014), O(topics in the document) a token; see sweep_range.
enum class SamplerKind { kDense = 0, kAliasMH = 1 };

struct GibbsConfig {
  int num_topics = 128;
  int64_t vocab_size = 0;
  double alpha = 0.1;  // symmetric document-topic prior
  double beta = 0.01;  // symmetric topic-word prior
  uint64_t seed = 0;
  int threads = 1;
  SamplerKind sampler = SamplerKind::kAliasMH;
  int mh_steps = 1;  // Metropolis-Hastings steps per token (alias sampler)
};

// Collapsed Gibbs sampler with AD-LDA parallelism: threads own contiguous document ranges and
// sample against their own copy of the word-topic counts; the copies are merged after each sweep.
// Holds the counts and a pointer to the caller's assignment array z (int16, -1 for tokens outside
// the vocabulary mask) — never anything per token beyond that.
class GibbsSampler {
 public:
  GibbsSampler(const GibbsConfig& config, const CorpusView& corpus, const uint8_t* keep, int16_t* z);

  // Draws every kept token's topic uniformly at random (z == -1 marks the others) and builds counts.
  void initialize();
  // Rebuilds the counts from an existing assignment array (resuming a fit).
  void rebuild_counts();
  void sweep();

  const std::vector<int32_t>& word_topic() const { return nwk_; }  // [V, K], word-major
  const std::vector<int64_t>& topic_counts() const { return nk_; }
  int64_t kept_vocab_size() const { return kept_vocab_; }
  int64_t kept_tokens() const { return kept_tokens_; }
  int64_t sweeps_done() const { return sweeps_; }
  // log p(w, z) of the collapsed model (Griffiths & Steyvers 2004, eq. 2 and 3); for monitoring.
  double log_joint() const;

 private:
  void sweep_range(int thread, int64_t doc_lo, int64_t doc_hi, int32_t* nwk, int64_t* nk);
  void build_alias_tables();

  GibbsConfig cfg_;
  CorpusView corpus_;
  const uint8_t* keep_;
  int16_t* z_;
  int64_t kept_vocab_ = 0;
  int64_t kept_tokens_ = 0;
  int64_t sweeps_ = 0;
  std::vector<int64_t> parts_;
  std::vector<int32_t> nwk_;  // [V, K]
  std::vector<int64_t> nk_;   // [K]
  std::vector<std::vector<int32_t>> local_nwk_;  // per-thread copies (threads > 1)
  std::vector<std::vector<int64_t>> local_nk_;
  // Alias tables of the word part of the proposal, q_w(k) ∝ (n_wk + beta) / (n_k + V beta), built
  // from the counts at the start of each sweep (stale within a sweep, which MH corrects for).
  struct AliasSlot {
    float prob;     // keep this slot's own topic with this probability, else take `alias`
    float q;        // alpha * q_w(k) of the slot's topic k: the proposal's word part, for MH
    int32_t alias;
  };
  std::vector<AliasSlot> alias_;   // [V, K]: one word's table in one contiguous run
  std::vector<float> alias_mass_;  // [V]: alpha * sum_k q_w(k), the word part's total mass
};

// topic-word matrix phi[w, k] = (n_wk + beta) / (n_k + V' beta) (V' = kept words), 0 for words
// outside the mask; word-major so one word's K probabilities are one contiguous row.
std::vector<float> topic_word_from_counts(const int32_t* nwk, const int64_t* nk, int64_t vocab_size,
                                          int num_topics, const uint8_t* keep, double beta);

struct InferConfig {
  int num_topics = 128;
  int64_t vocab_size = 0;
  double alpha = 0.1;
  int max_iterations = 50;
  double tolerance = 1e-4;  // stop when the L1 change of theta falls below it
  int threads = 1;
  bool ignore_unlabeled = false;  // label excluded tokens -1 instead of the dominant topic
};

// Per-document inference against a fixed phi [V, K]: the fixed point of
//   gamma_nk ∝ theta_k phi[w_n, k],  theta_k ∝ alpha + sum_n gamma_nk,
// (the E-step of EM with phi held fixed), started from a uniform theta. It is deterministic and
// depends on nothing but the document, so labels are the same for any thread count, chunking or
// sharding. theta_out is [D, K]; topic_out (nullable) gets argmax_k theta[d, k] * phi[k, w] for each
// token, and for tokens outside the mask the dominant topic (or -1 with ignore_unlabeled).
void infer(const InferConfig& cfg, const CorpusView& corpus, const float* phi, const uint8_t* keep,
           float* theta_out, int16_t* topic_out);

// Document-completion log-likelihood (Wallach et al. 2009, "estimated theta" variant): each
// document's kept tokens at even positions estimate theta by `infer`, the tokens at odd positions
// are scored by log sum_k theta_k phi[k, w]. Returns the summed log-likelihood and scored-token count.
std::pair<double, int64_t> doc_completion_loglik(const InferConfig& cfg, const CorpusView& corpus,
                                                 const float* phi, const uint8_t* keep);

}  // namespace doe_lda
