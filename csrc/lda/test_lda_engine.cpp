// GoogleTest unit tests of the LDA engine core (no Python).
#include <gtest/gtest.h>

#include <cmath>
#include <numeric>
#include <random>
#include <vector>

#include "lda_engine.h"

namespace {

using doe_lda::CorpusView;

struct Corpus {
  std::vector<uint32_t> tokens;
  std::vector<int64_t> offsets{0};
  std::vector<int> doc_topic;  // planted topic of each document
  CorpusView view() const {
    return CorpusView{tokens.data(), offsets.data(), static_cast<int64_t>(offsets.size()) - 1};
  }
};

// Documents each drawn from one of `topics` planted topics with disjoint word blocks of `words`
// ids; word ids >= topics * words are "stop" tokens mixed into every document.
Corpus planted(int topics, int words, int docs, int len, int stop_words, uint32_t seed) {
  std::mt19937 gen(seed);
  Corpus c;
  for (int d = 0; d < docs; ++d) {
    const int t = d % topics;
    c.doc_topic.push_back(t);
    for (int i = 0; i < len; ++i) {
      if (stop_words > 0 && i % 5 == 0)
        c.tokens.push_back(topics * words + gen() % stop_words);
      else
        c.tokens.push_back(t * words + gen() % words);
    }
    c.offsets.push_back(static_cast<int64_t>(c.tokens.size()));
  }
  return c;
}

doe_lda::GibbsConfig config(int K, int64_t V, doe_lda::SamplerKind kind, int threads, uint64_t seed) {
  doe_lda::GibbsConfig cfg;
  cfg.num_topics = K;
  cfg.vocab_size = V;
  cfg.alpha = 0.1;
  cfg.beta = 0.01;
  cfg.seed = seed;
  cfg.threads = threads;
  cfg.sampler = kind;
  return cfg;
}

TEST(ValidateCorpus, RejectsTokenOutsideVocabularyNamingThePosition) {
  std::vector<uint32_t> tokens{0, 1, 2, 7, 1};
  std::vector<int64_t> offsets{0, 3, 5};
  CorpusView c{tokens.data(), offsets.data(), 2};
  EXPECT_NO_THROW(doe_lda::validate_corpus(c, 8));
  try {
    doe_lda::validate_corpus(c, 5);
    FAIL() << "expected invalid_argument";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("token id 7 >= vocab size 5 at token 3 (document 1)"),
              std::string::npos)
        << e.what();
  }
}

TEST(ValidateCorpus, RejectsDecreasingOffsets) {
  std::vector<uint32_t> tokens{0, 1, 2};
  std::vector<int64_t> offsets{0, 3, 2};
  CorpusView c{tokens.data(), offsets.data(), 2};
  EXPECT_THROW(doe_lda::validate_corpus(c, 8), std::invalid_argument);
}

TEST(PartitionDocs, CoversAllDocumentsInBalancedContiguousRanges) {
  Corpus c = planted(2, 10, 101, 7, 0, 1);
  for (int parts : {1, 2, 3, 8}) {
    auto b = doe_lda::partition_docs(c.view(), parts);
    ASSERT_EQ(b.size(), static_cast<size_t>(parts + 1));
    EXPECT_EQ(b.front(), 0);
    EXPECT_EQ(b.back(), 101);
    for (int p = 0; p < parts; ++p) {
      EXPECT_LE(b[p], b[p + 1]);
      EXPECT_NEAR(static_cast<double>(b[p + 1] - b[p]), 101.0 / parts, 1.0);
    }
  }
}

TEST(CountWords, MatchesABruteForceCount) {
  Corpus c = planted(3, 5, 30, 9, 4, 2);
  const int64_t V = 3 * 5 + 4;
  std::vector<int64_t> counts(V), df(V), want_c(V, 0), want_df(V, 0);
  doe_lda::count_words(c.view(), V, 2, counts.data(), df.data());
  for (size_t d = 0; d + 1 < c.offsets.size(); ++d) {
    std::vector<bool> seen(V, false);
    for (int64_t i = c.offsets[d]; i < c.offsets[d + 1]; ++i) {
      ++want_c[c.tokens[i]];
      if (!seen[c.tokens[i]]) seen[c.tokens[i]] = true, ++want_df[c.tokens[i]];
    }
  }
  EXPECT_EQ(counts, want_c);
  EXPECT_EQ(df, want_df);
}

class SamplerTest : public ::testing::TestWithParam<std::tuple<doe_lda::SamplerKind, int>> {};

TEST_P(SamplerTest, CountsStayConsistentWithAssignments) {
  const auto [kind, threads] = GetParam();
  const int K = 4, words = 20, stop = 3;
  Corpus c = planted(K, words, 60, 40, stop, 3);
  const int64_t V = K * words + stop;
  std::vector<uint8_t> keep(V, 1);
  for (int s = 0; s < stop; ++s) keep[K * words + s] = 0;
  std::vector<int16_t> z(c.tokens.size(), 99);
  doe_lda::GibbsSampler sampler(config(K, V, kind, threads, 7), c.view(), keep.data(), z.data());
  sampler.initialize();
  for (int it = 0; it < 5; ++it) sampler.sweep();
  std::vector<int64_t> nwk(V * K, 0), nk(K, 0);
  int64_t kept = 0;
  for (size_t i = 0; i < z.size(); ++i) {
    if (!keep[c.tokens[i]]) {
      EXPECT_EQ(z[i], -1);
      continue;
    }
    ASSERT_GE(z[i], 0);
    ASSERT_LT(z[i], K);
    ++nwk[c.tokens[i] * K + z[i]];
    ++nk[z[i]];
    ++kept;
  }
  EXPECT_EQ(sampler.kept_tokens(), kept);
  for (int64_t i = 0; i < V * K; ++i) ASSERT_EQ(sampler.word_topic()[i], nwk[i]) << i;
  for (int k = 0; k < K; ++k) EXPECT_EQ(sampler.topic_counts()[k], nk[k]);
}

TEST_P(SamplerTest, RecoversPlantedTopics) {
  const auto [kind, threads] = GetParam();
  const int K = 4, words = 25;
  Corpus c = planted(K, words, 80, 60, 0, 4);
  const int64_t V = K * words;
  std::vector<uint8_t> keep(V, 1);
  std::vector<int16_t> z(c.tokens.size());
  doe_lda::GibbsSampler sampler(config(K, V, kind, threads, 11), c.view(), keep.data(), z.data());
  sampler.initialize();
  const double ll0 = sampler.log_joint();
  for (int it = 0; it < 60; ++it) sampler.sweep();
  EXPECT_GT(sampler.log_joint(), ll0);
  // Each planted word block should sit (almost) entirely in one topic, a different one per block.
  std::vector<int> block_topic(K);
  double purity = 0;
  for (int b = 0; b < K; ++b) {
    std::vector<int64_t> per_topic(K, 0);
    for (int w = b * words; w < (b + 1) * words; ++w)
      for (int k = 0; k < K; ++k) per_topic[k] += sampler.word_topic()[w * K + k];
    const auto best = std::max_element(per_topic.begin(), per_topic.end());
    block_topic[b] = static_cast<int>(best - per_topic.begin());
    purity += static_cast<double>(*best) /
              std::accumulate(per_topic.begin(), per_topic.end(), int64_t{0});
  }
  EXPECT_GT(purity / K, 0.95);
  std::sort(block_topic.begin(), block_topic.end());
  EXPECT_EQ(std::unique(block_topic.begin(), block_topic.end()), block_topic.end());
}

TEST_P(SamplerTest, SameSeedAndThreadsGiveTheSameChain) {
  const auto [kind, threads] = GetParam();
  Corpus c = planted(3, 15, 40, 30, 0, 5);
  const int64_t V = 45;
  std::vector<uint8_t> keep(V, 1);
  std::vector<int16_t> z1(c.tokens.size()), z2(c.tokens.size()), z3(c.tokens.size());
  doe_lda::GibbsSampler a(config(3, V, kind, threads, 1), c.view(), keep.data(), z1.data());
  doe_lda::GibbsSampler b(config(3, V, kind, threads, 1), c.view(), keep.data(), z2.data());
  doe_lda::GibbsSampler other(config(3, V, kind, threads, 2), c.view(), keep.data(), z3.data());
  for (auto* s : {&a, &b, &other}) {
    s->initialize();
    for (int it = 0; it < 4; ++it) s->sweep();
  }
  EXPECT_EQ(z1, z2);
  EXPECT_EQ(a.word_topic(), b.word_topic());
  EXPECT_NE(z1, z3);
}

INSTANTIATE_TEST_SUITE_P(Samplers, SamplerTest,
                         ::testing::Combine(::testing::Values(doe_lda::SamplerKind::kDense,
                                                              doe_lda::SamplerKind::kAliasMH),
                                            ::testing::Values(1, 2)));

TEST(Sampler, RebuildCountsRejectsAssignmentsThatDisagreeWithTheMask) {
  Corpus c = planted(2, 5, 4, 5, 0, 6);
  std::vector<uint8_t> keep(10, 1);
  keep[3] = 0;
  std::vector<int16_t> z(c.tokens.size());
  doe_lda::GibbsSampler s(config(2, 10, doe_lda::SamplerKind::kAliasMH, 1, 0), c.view(), keep.data(),
                          z.data());
  s.initialize();
  EXPECT_NO_THROW(s.rebuild_counts());
  const auto at = std::find(c.tokens.begin(), c.tokens.end(), 3u) - c.tokens.begin();
  ASSERT_LT(at, static_cast<long>(c.tokens.size()));
  z[at] = 1;
  EXPECT_THROW(s.rebuild_counts(), std::invalid_argument);
  z[at] = -1;
  z[at == 0 ? 1 : 0] = 7;  // a kept token with a topic >= K
  EXPECT_THROW(s.rebuild_counts(), std::invalid_argument);
}

TEST(Sampler, RejectsBadConfiguration) {
  Corpus c = planted(2, 5, 4, 5, 0, 6);
  std::vector<uint8_t> keep(10, 1), none(10, 0);
  std::vector<int16_t> z(c.tokens.size());
  auto cfg = config(2, 10, doe_lda::SamplerKind::kAliasMH, 1, 0);
  cfg.num_topics = 40000;
  EXPECT_THROW(doe_lda::GibbsSampler(cfg, c.view(), keep.data(), z.data()), std::invalid_argument);
  cfg = config(2, 10, doe_lda::SamplerKind::kAliasMH, 1, 0);
  EXPECT_THROW(doe_lda::GibbsSampler(cfg, c.view(), none.data(), z.data()), std::invalid_argument);
  cfg.vocab_size = 8;  // corpus holds ids up to 9
  EXPECT_THROW(doe_lda::GibbsSampler(cfg, c.view(), keep.data(), z.data()), std::invalid_argument);
}

// phi of K disjoint blocks: phi[w, k] = 1/words for w in block k.
std::vector<float> block_phi(int K, int words, int64_t V) {
  std::vector<float> phi(V * K, 0.0f);
  for (int k = 0; k < K; ++k)
    for (int w = k * words; w < (k + 1) * words; ++w) phi[w * K + k] = 1.0f / words;
  // Smooth a little so every kept word has some mass in every topic.
  for (auto& p : phi) p = 0.95f * p + 0.05f / V;
  return phi;
}

TEST(TopicWord, RowsOfKeptWordsSumToOnePerTopic) {
  const int K = 3;
  const int64_t V = 6;
  std::vector<int32_t> nwk{5, 0, 1, 0, 2, 0, 3, 3, 3, 9, 9, 9, 1, 0, 0, 0, 0, 4};
  std::vector<uint8_t> keep{1, 1, 1, 0, 1, 1};
  std::vector<int64_t> nk{9, 5, 8};  // column sums over kept words
  auto phi = doe_lda::topic_word_from_counts(nwk.data(), nk.data(), V, K, keep.data(), 0.5);
  for (int k = 0; k < K; ++k) {
    double s = 0;
    for (int64_t w = 0; w < V; ++w) s += phi[w * K + k];
    EXPECT_NEAR(s, 1.0, 1e-6);
    EXPECT_EQ(phi[3 * K + k], 0.0f);
  }
  EXPECT_NEAR(phi[0], (5 + 0.5) / (9 + 5 * 0.5), 1e-6);
}

TEST(Infer, LabelsTokensByPlantedTopicAndFillsExcludedTokens) {
  const int K = 3, words = 10;
  const int64_t V = K * words + 2;
  auto phi = block_phi(K, words, V);
  std::vector<uint8_t> keep(V, 1);
  keep[V - 1] = keep[V - 2] = 0;
  for (int k = 0; k < K; ++k) phi[(V - 1) * K + k] = phi[(V - 2) * K + k] = 0;
  // doc 0: topic 1 words and one excluded token; doc 1: mostly topic 2, two topic-0 words; doc 2: only excluded.
  std::vector<uint32_t> tokens{10, 11, 12, static_cast<uint32_t>(V - 1), 13, 20, 21, 22, 23, 24,
                               25, 0, 1, static_cast<uint32_t>(V - 2)};
  std::vector<int64_t> offsets{0, 5, 13, 14};
  CorpusView c{tokens.data(), offsets.data(), 3};
  doe_lda::InferConfig cfg;
  cfg.num_topics = K;
  cfg.vocab_size = V;
  cfg.alpha = 0.1;
  std::vector<float> theta(3 * K);
  std::vector<int16_t> labels(tokens.size());
  doe_lda::infer(cfg, c, phi.data(), keep.data(), theta.data(), labels.data());
  EXPECT_GT(theta[0 * K + 1], 0.9f);
  EXPECT_GT(theta[1 * K + 2], 0.6f);
  EXPECT_GT(theta[1 * K + 0], theta[1 * K + 1]);
  for (int k = 0; k < K; ++k) EXPECT_NEAR(theta[2 * K + k], 1.0f / K, 1e-6);
  std::vector<int16_t> want{1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 0, 0, -1};
  EXPECT_EQ(labels, want);
  cfg.ignore_unlabeled = true;
  doe_lda::infer(cfg, c, phi.data(), keep.data(), theta.data(), labels.data());
  EXPECT_EQ(labels[3], -1);
  EXPECT_EQ(labels[0], 1);
}

TEST(Infer, ResultsDoNotDependOnThreadCountOrChunking) {
  const int K = 4, words = 12;
  Corpus c = planted(K, words, 50, 33, 0, 8);
  const int64_t V = K * words;
  auto phi = block_phi(K, words, V);
  std::vector<uint8_t> keep(V, 1);
  doe_lda::InferConfig cfg;
  cfg.num_topics = K;
  cfg.vocab_size = V;
  std::vector<float> t1(50 * K), t2(50 * K), t3(50 * K);
  std::vector<int16_t> l1(c.tokens.size()), l2(c.tokens.size()), l3(c.tokens.size());
  cfg.threads = 1;
  doe_lda::infer(cfg, c.view(), phi.data(), keep.data(), t1.data(), l1.data());
  cfg.threads = 2;
  doe_lda::infer(cfg, c.view(), phi.data(), keep.data(), t2.data(), l2.data());
  // Two chunks of documents [0, 17) and [17, 50), the second starting mid-array.
  CorpusView a{c.tokens.data(), c.offsets.data(), 17};
  CorpusView b{c.tokens.data() + c.offsets[17], c.offsets.data() + 17, 33};
  doe_lda::infer(cfg, a, phi.data(), keep.data(), t3.data(), l3.data());
  doe_lda::infer(cfg, b, phi.data(), keep.data(), t3.data() + 17 * K, l3.data() + c.offsets[17]);
  EXPECT_EQ(t1, t2);
  EXPECT_EQ(l1, l2);
  EXPECT_EQ(t1, t3);
  EXPECT_EQ(l1, l3);
  for (size_t d = 0; d < 50; ++d)
    for (int64_t i = c.offsets[d]; i < c.offsets[d + 1]; ++i) EXPECT_EQ(l1[i], c.doc_topic[d]);
}

TEST(DocCompletion, TrueTopicsScoreBetterThanUniformOnes) {
  const int K = 4, words = 12;
  Corpus c = planted(K, words, 40, 30, 0, 9);
  const int64_t V = K * words;
  auto phi = block_phi(K, words, V);
  std::vector<float> uniform(V * K, 1.0f / V);
  std::vector<uint8_t> keep(V, 1);
  doe_lda::InferConfig cfg;
  cfg.num_topics = K;
  cfg.vocab_size = V;
  auto [ll_true, n_true] = doe_lda::doc_completion_loglik(cfg, c.view(), phi.data(), keep.data());
  auto [ll_unif, n_unif] = doe_lda::doc_completion_loglik(cfg, c.view(), uniform.data(), keep.data());
  EXPECT_EQ(n_true, 40 * 15);
  EXPECT_EQ(n_true, n_unif);
  EXPECT_NEAR(ll_unif / n_unif, -std::log(static_cast<double>(V)), 1e-5);
  // A perfect model of a planted block scores about log(words) nats per token.
  EXPECT_GT(ll_true / n_true, -std::log(words / 0.95) - 0.1);
}

}  // namespace
