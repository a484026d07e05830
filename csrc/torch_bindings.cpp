// Every op schema of doe_ext, in one place. Backends (csrc/cpu, csrc/cuda) only add kernels;
// Python (src/doe_ext/ops) adds the fake kernels and autograd.
#include <Python.h>
#include <torch/library.h>

#include <string>

#ifndef DOE_EXT_CUDA_ARCHS
#define DOE_EXT_CUDA_ARCHS ""
#endif

namespace doe_ext {
namespace {

// "cuda=<0|1>;archs=<list>": what this binary was built with (read by doe_ext.build_info()).
std::string build_config() {
#ifdef DOE_EXT_WITH_CUDA
  return std::string("cuda=1;archs=") + DOE_EXT_CUDA_ARCHS;
#else
  return "cuda=0;archs=";
#endif
}

}  // namespace

TORCH_LIBRARY(doe_ext, m) {
  m.def("_build_config() -> str", &build_config);
  // DoE eq. 1-3: out = residual + softmax(q @ z_key.T * scale) @ z_value; lse per row (float32 for
  // half inputs) for the backward; probs [..., K] only when return_probs, else an empty tensor.
  // (The CPU wrapper asks for probs when a backward will follow: reusing them there saves a GEMM.)
  m.def("knowledge_attention_fwd(Tensor q, Tensor z_key, Tensor z_value, Tensor? residual, float scale, "
        "bool return_probs) -> (Tensor out, Tensor lse, Tensor probs)");
  // Gradients of knowledge_attention_fwd's out w.r.t. q, z_key, z_value (residual's is grad_out);
  // probs from the forward, or empty to rebuild them from lse.
  m.def("knowledge_attention_bwd(Tensor grad_out, Tensor q, Tensor z_key, Tensor z_value, Tensor lse, "
        "Tensor probs, float scale) -> (Tensor grad_q, Tensor grad_z_key, Tensor grad_z_value)");

  // ---- VAE-ReLU router and expert-label loss (CONTRACT §2.2, §2.4) ----

  // ---- dual embedding and LoRA experts (CONTRACT §2.3, §2.5) ----
}

}  // namespace doe_ext

// `import doe_ext._C` loads this library (and so registers the ops); it has no Python functions.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
