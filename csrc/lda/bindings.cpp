// pybind11 bindings of the LDA engine: doe_ext._lda. Arrays cross as NumPy buffers (memory maps
// included) without copies; every long call releases the GIL.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <string>

#include "lda_engine.h"

namespace py = pybind11;
using doe_lda::CorpusView;

namespace {

template <class T>
using CArray = py::array_t<T, py::array::c_style>;

template <class T>
const T* ro(const py::array& a, const char* name, py::ssize_t size = -1) {
  if (!py::isinstance<CArray<T>>(a) || !(a.flags() & py::array::c_style))
    throw py::type_error(std::string(name) + ": expected a C-contiguous array of dtype " +
                         py::str(py::dtype::of<T>()).cast<std::string>() + ", got " +
                         py::str(a.dtype()).cast<std::string>());
  if (size >= 0 && a.size() != size)
    throw py::value_error(std::string(name) + ": expected " + std::to_string(size) +
                          " elements, got " + std::to_string(a.size()));
  return static_cast<const T*>(a.data());
}

template <class T>
T* rw(py::array& a, const char* name, py::ssize_t size) {
  ro<T>(a, name, size);
  if (!a.writeable()) throw py::value_error(std::string(name) + ": array is read-only");
  return static_cast<T*>(a.mutable_data());
}

CorpusView view(const py::array& tokens, const py::array& offsets) {
  CorpusView c;
  c.offsets = ro<int64_t>(offsets, "offsets");
  if (offsets.size() < 1) throw py::value_error("offsets: needs at least one entry (D + 1)");
  c.num_docs = offsets.size() - 1;
  c.tokens = ro<uint32_t>(tokens, "tokens");
  if (c.num_tokens() != tokens.size())
    throw py::value_error("tokens: offsets span " + std::to_string(c.num_tokens()) +
                          " tokens but the array holds " + std::to_string(tokens.size()));
  return c;
}

// Keeps the NumPy arrays alive for as long as the sampler points into them.
class PySampler {
 public:
  PySampler(py::array tokens, py::array offsets, py::array keep, py::array z, int num_topics,
            double alpha, double beta, uint64_t seed, int threads, const std::string& sampler,
            int mh_steps)
      : tokens_(tokens), offsets_(offsets), keep_(keep), z_(z) {
    const CorpusView c = view(tokens, offsets);
    doe_lda::GibbsConfig cfg;
    cfg.num_topics = num_topics;
    cfg.vocab_size = keep.size();
    cfg.alpha = alpha;
    cfg.beta = beta;
    cfg.seed = seed;
    cfg.threads = threads;
    cfg.mh_steps = mh_steps;
    if (sampler == "dense")
      cfg.sampler = doe_lda::SamplerKind::kDense;
    else if (sampler == "alias")
      cfg.sampler = doe_lda::SamplerKind::kAliasMH;
    else
      throw py::value_error("sampler must be 'alias' or 'dense', got '" + sampler + "'");
    const uint8_t* k = ro<uint8_t>(keep, "keep");
    int16_t* zp = rw<int16_t>(z_, "z", tokens.size());
    py::gil_scoped_release nogil;
    sampler_ = std::make_unique<doe_lda::GibbsSampler>(cfg, c, k, zp);
  }
  void initialize() {
    py::gil_scoped_release nogil;
    sampler_->initialize();
  }
  void rebuild_counts() {
    py::gil_scoped_release nogil;
    sampler_->rebuild_counts();
  }
  void sweep(int n) {
    py::gil_scoped_release nogil;
    for (int i = 0; i < n; ++i) sampler_->sweep();
  }
  double log_joint() {
    py::gil_scoped_release nogil;
    return sampler_->log_joint();
  }
  py::array word_topic() const {
    const auto& v = sampler_->word_topic();
    const py::ssize_t K = static_cast<py::ssize_t>(sampler_->topic_counts().size());
    CArray<int32_t> out({static_cast<py::ssize_t>(v.size()) / K, K});
    std::copy(v.begin(), v.end(), out.mutable_data());
    return out;
  }
  py::array topic_counts() const {
    const auto& v = sampler_->topic_counts();
    CArray<int64_t> out(static_cast<py::ssize_t>(v.size()));
    std::copy(v.begin(), v.end(), out.mutable_data());
    return out;
  }
  int64_t kept_tokens() const { return sampler_->kept_tokens(); }
  int64_t kept_vocab() const { return sampler_->kept_vocab_size(); }

 private:
  py::array tokens_, offsets_, keep_, z_;
  std::unique_ptr<doe_lda::GibbsSampler> sampler_;
};

doe_lda::InferConfig infer_config(int num_topics, int64_t vocab, double alpha, int iterations,
                                  double tolerance, int threads, bool ignore) {
  doe_lda::InferConfig cfg;
  cfg.num_topics = num_topics;
  cfg.vocab_size = vocab;
  cfg.alpha = alpha;
  cfg.max_iterations = iterations;
  cfg.tolerance = tolerance;
  cfg.threads = threads;
  cfg.ignore_unlabeled = ignore;
  return cfg;
}

void check_phi(const py::array& phi, const py::array& keep) {
  if (phi.ndim() != 2 || phi.shape(0) != keep.size())
    throw py::value_error("phi: expected shape [vocab_size, num_topics] with vocab_size " +
                          std::to_string(keep.size()));
}

}  // namespace

PYBIND11_MODULE(_lda, m) {
  m.doc() = "doe_ext Stage-1 LDA engine (C++17; collapsed Gibbs, inference, labelling)";

  py::class_<PySampler>(m, "GibbsSampler")
      .def(py::init<py::array, py::array, py::array, py::array, int, double, double, uint64_t, int,
                    const std::string&, int>(),
           py::arg("tokens"), py::arg("offsets"), py::arg("keep"), py::arg("z"),
           py::arg("num_topics"), py::arg("alpha"), py::arg("beta"), py::arg("seed"),
           py::arg("threads"), py::arg("sampler") = "alias", py::arg("mh_steps") = 1)
      .def("initialize", &PySampler::initialize, "Random initial assignments (writes z).")
      .def("rebuild_counts", &PySampler::rebuild_counts, "Counts from the assignments in z.")
      .def("sweep", &PySampler::sweep, py::arg("n") = 1, "n Gibbs sweeps over the corpus.")
      .def("log_joint", &PySampler::log_joint, "log p(w, z) of the collapsed model.")
      .def("word_topic", &PySampler::word_topic, "Counts n_wk, int32 [V, K].")
      .def("topic_counts", &PySampler::topic_counts, "Counts n_k, int64 [K].")
      .def_property_readonly("kept_tokens", &PySampler::kept_tokens)
      .def_property_readonly("kept_vocab", &PySampler::kept_vocab);

  m.def(
      "topic_word",
      [](py::array nwk, py::array nk, py::array keep, double beta) {
        const py::ssize_t K = nk.size();
        const py::ssize_t V = keep.size();
        const int32_t* pn = ro<int32_t>(nwk, "nwk", V * K);
        const int64_t* pk = ro<int64_t>(nk, "nk");
        const uint8_t* pm = ro<uint8_t>(keep, "keep");
        std::vector<float> phi;
        {
          py::gil_scoped_release nogil;
          phi = doe_lda::topic_word_from_counts(pn, pk, V, static_cast<int>(K), pm, beta);
        }
        CArray<float> out({V, K});
        std::copy(phi.begin(), phi.end(), out.mutable_data());
        return out;
      },
      py::arg("nwk"), py::arg("nk"), py::arg("keep"), py::arg("beta"),
      "phi[w, k] = (n_wk + beta) / (n_k + V' beta), float32 [V, K] (0 for words outside keep).");

  m.def(
      "infer",
      [](py::array tokens, py::array offsets, py::array phi, py::array keep, double alpha,
         int iterations, double tolerance, int threads, py::array theta_out, py::object topic_out,
         bool ignore_unlabeled) {
        const CorpusView c = view(tokens, offsets);
        check_phi(phi, keep);
        const int K = static_cast<int>(phi.shape(1));
        const float* pp = ro<float>(phi, "phi");
        const uint8_t* pm = ro<uint8_t>(keep, "keep");
        float* pt = rw<float>(theta_out, "theta_out", c.num_docs * K);
        int16_t* pz = nullptr;
        py::array zarr;
        if (!topic_out.is_none()) {
          zarr = topic_out.cast<py::array>();
          pz = rw<int16_t>(zarr, "topic_out", tokens.size());
        }
        auto cfg = infer_config(K, keep.size(), alpha, iterations, tolerance, threads,
                                ignore_unlabeled);
        py::gil_scoped_release nogil;
        doe_lda::infer(cfg, c, pp, pm, pt, pz);
      },
      py::arg("tokens"), py::arg("offsets"), py::arg("phi"), py::arg("keep"), py::arg("alpha"),
      py::arg("iterations"), py::arg("tolerance"), py::arg("threads"), py::arg("theta_out"),
      py::arg("topic_out") = py::none(), py::arg("ignore_unlabeled") = false,
      "theta [D, K] by EM against fixed phi, and per-token labels argmax_k theta[d,k] phi[k,w].");

  m.def(
      "doc_completion_loglik",
      [](py::array tokens, py::array offsets, py::array phi, py::array keep, double alpha,
         int iterations, double tolerance, int threads) {
        const CorpusView c = view(tokens, offsets);
        check_phi(phi, keep);
        const int K = static_cast<int>(phi.shape(1));
        const float* pp = ro<float>(phi, "phi");
        const uint8_t* pm = ro<uint8_t>(keep, "keep");
        auto cfg = infer_config(K, keep.size(), alpha, iterations, tolerance, threads, false);
        py::gil_scoped_release nogil;
        return doe_lda::doc_completion_loglik(cfg, c, pp, pm);
      },
      py::arg("tokens"), py::arg("offsets"), py::arg("phi"), py::arg("keep"), py::arg("alpha"),
      py::arg("iterations"), py::arg("tolerance"), py::arg("threads"),
      "(sum of log p(w), number of scored tokens) of the document-completion estimate.");

  m.def(
      "count_words",
      [](py::array tokens, py::array offsets, int64_t vocab_size, int threads) {
        const CorpusView c = view(tokens, offsets);
        CArray<int64_t> counts(vocab_size), df(vocab_size);
        int64_t* pc = counts.mutable_data();
        int64_t* pd = df.mutable_data();
        {
          py::gil_scoped_release nogil;
          doe_lda::count_words(c, vocab_size, threads, pc, pd);
        }
        return py::make_tuple(counts, df);
      },
      py::arg("tokens"), py::arg("offsets"), py::arg("vocab_size"), py::arg("threads") = 1,
      "(token counts, document frequencies), int64 [vocab_size] each.");

  m.def(
      "validate_corpus",
      [](py::array tokens, py::array offsets, int64_t vocab_size) {
        const CorpusView c = view(tokens, offsets);
        py::gil_scoped_release nogil;
        doe_lda::validate_corpus(c, vocab_size);
      },
      py::arg("tokens"), py::arg("offsets"), py::arg("vocab_size"));

}
