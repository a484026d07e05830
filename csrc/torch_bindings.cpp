// Every op schema of doe_ext, in one place. Backends (csrc/cpu, csrc/cuda) only add kernels;
// Python (src/doe_ext/ops) adds the fake kernels and autograd.
#include <Python.h>
#include <torch/library.h>

#include <string>
#include <vector>

#include "doe_ext/dual_embedding.h"
#include "doe_ext/expert_loss.h"
#include "doe_ext/knowledge_attention.h"
#include "doe_ext/lora.h"
#include "doe_ext/vae_relu_router.h"

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

// Marks each meta stand-in as standing for its FakeTensor's device while an op's checks run.
class StandIns {
 public:
  StandIns(const std::vector<std::optional<at::Tensor>>& tensors, const std::string& devices) {
    size_t start = 0;
    for (const auto& t : tensors) {
      const size_t end = devices.find(',', start);
      const std::string dev = devices.substr(start, end == std::string::npos ? std::string::npos : end - start);
      start = end == std::string::npos ? devices.size() : end + 1;
      if (t.has_value()) device_stand_ins().push_back({t->unsafeGetTensorImpl(), c10::Device(dev)});
    }
  }
  ~StandIns() { device_stand_ins().clear(); }
};

// The argument checks of op `op`, exactly as its CPU and CUDA kernels run them first, on `tensors`
// (its tensor arguments in schema order; meta stand-ins of a fake kernel's FakeTensors, whose devices
// `devices` lists, comma-separated), `ints`, `floats` and `text` (its int / float / string arguments).
void check_op(c10::string_view op_name, const c10::List<std::optional<at::Tensor>>& list, c10::string_view devices,
              std::vector<int64_t> ints, std::vector<double> floats, c10::string_view text) {
  const std::string op(op_name);
  std::vector<std::optional<at::Tensor>> t;
  for (size_t i = 0; i < list.size(); ++i) t.push_back(list.get(i));
  const StandIns stand_ins(t, std::string(devices));
  // A None for a required tensor stays an undefined tensor, which the op's checks refuse by name.
  static const at::Tensor kNone;
  const auto T = [&](size_t i) -> const at::Tensor& { return t.at(i).has_value() ? *t.at(i) : kNone; };
  const std::string str(text);
  if (op == "knowledge_attention_fwd") {
    check_knowledge_attention(T(0), T(1), T(2), t.at(3));
  } else if (op == "knowledge_attention_bwd") {
    check_knowledge_attention_bwd(T(0), T(1), T(2), T(3), T(4), T(5));
  } else if (op == "vae_relu_router_fwd") {
    check_vae_relu_router(T(0), T(1), T(2), T(3), T(4), T(5), T(6), t.at(7), t.at(8), ints.at(0) != 0, str);
  } else if (op == "vae_relu_router_bwd") {
    vr::check_backward(t.at(0), t.at(1), t.at(2), t.at(3), T(4), T(5), T(6), T(7), T(8), T(9), T(10), t.at(11),
                       t.at(12), ints.at(0) != 0, str);
  } else if (op == "expert_loss_fwd") {
    check_expert_loss(T(0), T(1), str, floats.at(0));
  } else if (op == "expert_loss_bwd") {
    check_expert_loss_bwd(T(0), T(1), T(2));
  } else if (op == "dual_embedding_fwd") {
    const auto sz = check_dual_embedding(T(0), T(1), T(2), T(3));
    check_padding_idx(ints.at(0), sz.V);
  } else if (op == "dual_embedding_bwd") {
    check_dual_embedding_bwd(T(0), T(1), T(2), T(3), T(4), ints.at(0));
  } else if (op == "lora_merge" || op == "lora_merge_") {
    check_lora_merge(T(0), T(1), T(2), T(3), op.c_str());
  } else if (op == "lora_merge_bwd") {
    check_lora_merge(T(0), T(1), T(2), T(3), "lora_merge_bwd", "grad_out");
  } else if (op == "multi_lora_linear_fwd") {
    check_multi_lora_linear(T(0), T(1), t.at(2), T(3), T(4), T(5), T(6));
  } else if (op == "multi_lora_linear_bwd") {
    check_multi_lora_linear_bwd(T(0), T(1), T(2), T(3), T(4), T(5), T(6), T(7));
  } else {
    TORCH_CHECK(false, "doe_ext::_check: no op ", op);
  }
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
  // DoE §3.4 / App. A.3: mu_logvar = h @ [w_mu; w_logvar].T + [b_mu; b_logvar] (one GEMM), z = mu +
  // exp(logvar/2) * eps, logits = z @ w_gate.T + b_gate, gates = relu|softmax(logits), kl per token.
  // eps: `noise` when given, else Philox(rng = [key, stream] int64 on h's device), else 0 (eval).
  // z is the latent sample (for a decoder, App. H.3). Telemetry: block_counts [K] (rows with gate
  // k > 0), zero_rows [] (rows with every gate 0).
  m.def("vae_relu_router_fwd(Tensor h, Tensor w_mu, Tensor b_mu, Tensor w_logvar, Tensor b_logvar, "
        "Tensor w_gate, Tensor b_gate, Tensor? noise, Tensor? rng, bool training, str activation) -> "
        "(Tensor gates, Tensor logits, Tensor kl, Tensor z, Tensor mu_logvar, Tensor block_counts, Tensor zero_rows)");
  // Gradients of vae_relu_router_fwd (any of the four output grads may be None); eps is
  // regenerated from rng, never stored.
  m.def("vae_relu_router_bwd(Tensor? grad_gates, Tensor? grad_logits, Tensor? grad_kl, Tensor? grad_z, Tensor h, "
        "Tensor w_mu, Tensor w_logvar, Tensor w_gate, Tensor mu_logvar, Tensor gates, Tensor logits, "
        "Tensor? noise, Tensor? rng, bool training, str activation) -> (Tensor grad_h, Tensor grad_w_mu, "
        "Tensor grad_b_mu, Tensor grad_w_logvar, Tensor grad_b_logvar, Tensor grad_w_gate, Tensor grad_b_gate)");
  // DoE eq. 4 L_expert: cross-entropy to int64 labels (ignore_index, label_smoothing) or KL(t || softmax)
  // to float targets, one pass that also writes d(row loss)/d(logits) when keep_grad; weight is the
  // reduction's row factor (1/count for mean, 1 for sum/none, 0-safe).
  m.def("expert_loss_fwd(Tensor logits, Tensor target, int ignore_index, str reduction, float label_smoothing, "
        "bool keep_grad) -> (Tensor loss, Tensor grad_rows, Tensor weight)");
  // grad_logits = grad_rows * grad_loss * weight, grad_loss broadcast over each row's K logits.
  m.def("expert_loss_bwd(Tensor grad_loss, Tensor grad_rows, Tensor weight) -> Tensor");

  // ---- dual embedding and LoRA experts (CONTRACT §2.3, §2.5) ----
  // DoE §3.3 / Alg. 1: out = cat(token_weight[token_ids], topic_weight[topic_ids] (0 where -1), -1);
  // raises on an out-of-range id, naming token_ids or topic_ids. padding_idx (-1: none) only
  // matters to the backward; it is here, as in aten::embedding, so autograd can read it.
  m.def("dual_embedding_fwd(Tensor token_ids, Tensor topic_ids, Tensor token_weight, Tensor topic_weight, "
        "int padding_idx=-1) -> Tensor");
  // Dense, deterministic gradients of both tables (ids sorted, runs reduced in token order; no
  // atomics); rows at padding_idx (>= 0) and topic ids -1 get none. The weights give shapes only.
  m.def("dual_embedding_bwd(Tensor grad_out, Tensor token_ids, Tensor topic_ids, Tensor token_weight, "
        "Tensor topic_weight, int padding_idx) -> (Tensor grad_token_weight, Tensor grad_topic_weight)");
  // DMoE eq. 6, baking E experts into a weight: weight + sum_e scales[e] * lora_b[e] @ lora_a[e].
  m.def("lora_merge(Tensor weight, Tensor lora_a, Tensor lora_b, Tensor scales) -> Tensor");
  // The same sum written into weight in place (export; no autograd).
  m.def("lora_merge_(Tensor(a!) weight, Tensor lora_a, Tensor lora_b, Tensor scales) -> ()");
  // Gradients of lora_merge w.r.t. lora_a, lora_b, scales (weight's is grad_out itself).
  m.def("lora_merge_bwd(Tensor grad_out, Tensor lora_a, Tensor lora_b, Tensor scales) "
        "-> (Tensor grad_lora_a, Tensor grad_lora_b, Tensor grad_scales)");
  // Mixed-batch multi-LoRA linear: y[t] = x[t] @ weight.T + bias
  //   + sum_j [indices[t,j] >= 0] scales[t,j] * lora_b[i] @ (lora_a[i] @ x[t]),  i = indices[t, j].
  // xa [T, k, r] = lora_a[i] @ x[t] per slot (0 for empty slots), kept for the backward.
  m.def("multi_lora_linear_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor lora_a, Tensor lora_b, "
        "Tensor indices, Tensor scales) -> (Tensor out, Tensor xa)");
  // Gradients of multi_lora_linear_fwd's out; grad_weight/grad_bias only when need_weight_grad,
  // the LoRA and scale grads only when need_lora_grad (else empty tensors).
  m.def("multi_lora_linear_bwd(Tensor grad_out, Tensor x, Tensor weight, Tensor lora_a, Tensor lora_b, "
        "Tensor indices, Tensor scales, Tensor xa, bool need_weight_grad, bool need_lora_grad) -> "
        "(Tensor grad_x, Tensor grad_weight, Tensor grad_bias, Tensor grad_lora_a, Tensor grad_lora_b, "
        "Tensor grad_scales)");

  // The fake kernels' argument checks (see check_op): torch.compile rejects what eager rejects, with
  // the same message, because both run the same C++ checks.
  m.def("_check(str op, Tensor?[] tensors, str devices, int[] ints, float[] floats, str text) -> ()");
}

TORCH_LIBRARY_IMPL(doe_ext, CompositeExplicitAutograd, m) { m.impl("_check", &check_op); }

}  // namespace doe_ext

// `import doe_ext._C` loads this library (and so registers the ops); it has no Python functions.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
