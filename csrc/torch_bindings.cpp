// Every op schema of doe_ext, in one place. Backends (csrc/cpu, csrc/cuda) only add kernels;
// Python (src/doe_ext/ops) adds the fake kernels and autograd.
#include <Python.h>
#include <torch/headeronly/version.h>

#include "doe_ext/tensor.h"

#include <string>
#include <vector>

#include "doe_ext/decode_linear.h"
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

// "cuda=<0|1>;archs=<list>;abi=stable;torch_target=<x.y>;torch_built=<x.y.z>": what this binary
// was built with (read by doe_ext.build_info()): the oldest torch it loads in (the stable ABI's
// TORCH_TARGET_VERSION) and the torch whose headers built it.
std::string build_config() {
#ifdef DOE_EXT_WITH_CUDA
  std::string cfg = std::string("cuda=1;archs=") + DOE_EXT_CUDA_ARCHS;
#else
  std::string cfg = "cuda=0;archs=";
#endif
  return cfg + str(";abi=stable;torch_target=", (TORCH_TARGET_VERSION >> 56) & 0xff, ".",
                   (TORCH_TARGET_VERSION >> 48) & 0xff, ";torch_built=", TORCH_VERSION_MAJOR, ".",
                   TORCH_VERSION_MINOR, ".", TORCH_VERSION_PATCH);
}

// Marks each meta stand-in as standing for its FakeTensor's device while an op's checks run.
// `devices`: one entry per tensor argument, comma-separated ("" for a None).
class StandIns {
 public:
  StandIns(std::string_view devices_view, std::initializer_list<const Tensor*> tensors) {
    const std::string devices(devices_view);
    size_t start = 0;
    for (const Tensor* t : tensors) {
      const size_t end = devices.find(',', start);
      const std::string dev = devices.substr(start, end == std::string::npos ? std::string::npos : end - start);
      start = end == std::string::npos ? devices.size() : end + 1;
      if (t != nullptr && t->defined()) device_stand_ins().push_back({t->get(), parse_device(dev)});
    }
  }
  ~StandIns() { device_stand_ins().clear(); }
};

const Tensor* opt(const std::optional<Tensor>& t) { return t.has_value() ? &*t : nullptr; }

// Each op's argument checks for its fake kernel: `_check_<op>(devices, <the op's arguments>)` runs
// the very check function its CPU and CUDA kernels run first, on meta stand-ins of the fake
// kernel's FakeTensors that report the FakeTensors' devices (`devices`). One typed function per op.
void check_knowledge_attention_fwd(std::string_view devices, const Tensor& q, const Tensor& z_key,
                                   const Tensor& z_value, const std::optional<Tensor>& residual, double, bool) {
  const StandIns s(devices, {&q, &z_key, &z_value, opt(residual)});
  check_knowledge_attention(q, z_key, z_value, residual);
}
void check_knowledge_attention_bwd_(std::string_view devices, const Tensor& grad_out, const Tensor& q,
                                    const Tensor& z_key, const Tensor& z_value, const Tensor& lse,
                                    const Tensor& probs, double) {
  const StandIns s(devices, {&grad_out, &q, &z_key, &z_value, &lse, &probs});
  check_knowledge_attention_bwd(grad_out, q, z_key, z_value, lse, probs);
}
void check_vae_relu_router_fwd(std::string_view devices, const Tensor& h, const Tensor& w_mu,
                               const Tensor& b_mu, const Tensor& w_logvar, const Tensor& b_logvar,
                               const Tensor& w_gate, const Tensor& b_gate,
                               const std::optional<Tensor>& noise, const std::optional<Tensor>& rng,
                               bool training, std::string_view activation) {
  const StandIns s(devices, {&h, &w_mu, &b_mu, &w_logvar, &b_logvar, &w_gate, &b_gate, opt(noise), opt(rng)});
  check_vae_relu_router(h, w_mu, b_mu, w_logvar, b_logvar, w_gate, b_gate, noise, rng, training,
                        std::string(activation));
}
void check_vae_relu_router_bwd(std::string_view devices, const std::optional<Tensor>& grad_gates,
                               const std::optional<Tensor>& grad_logits, const std::optional<Tensor>& grad_kl,
                               const std::optional<Tensor>& grad_z, const Tensor& h, const Tensor& w_mu,
                               const Tensor& w_logvar, const Tensor& w_gate, const Tensor& mu_logvar,
                               const Tensor& gates, const Tensor& logits,
                               const std::optional<Tensor>& noise, const std::optional<Tensor>& rng,
                               bool training, std::string_view activation) {
  const StandIns s(devices, {opt(grad_gates), opt(grad_logits), opt(grad_kl), opt(grad_z), &h, &w_mu, &w_logvar,
                             &w_gate, &mu_logvar, &gates, &logits, opt(noise), opt(rng)});
  vr::check_backward(grad_gates, grad_logits, grad_kl, grad_z, h, w_mu, w_logvar, w_gate, mu_logvar, gates, logits,
                     noise, rng, training, std::string(activation));
}
void check_expert_loss_fwd(std::string_view devices, const Tensor& logits, const Tensor& target, int64_t,
                           std::string_view reduction, double label_smoothing, bool) {
  const StandIns s(devices, {&logits, &target});
  check_expert_loss(logits, target, std::string(reduction), label_smoothing);
}
void check_expert_loss_bwd_(std::string_view devices, const Tensor& grad_loss, const Tensor& grad_rows,
                            const Tensor& weight) {
  const StandIns s(devices, {&grad_loss, &grad_rows, &weight});
  check_expert_loss_bwd(grad_loss, grad_rows, weight);
}
void check_dual_embedding_fwd(std::string_view devices, const Tensor& token_ids, const Tensor& topic_ids,
                              const Tensor& token_weight, const Tensor& topic_weight, int64_t padding_idx) {
  const StandIns s(devices, {&token_ids, &topic_ids, &token_weight, &topic_weight});
  check_padding_idx(padding_idx, check_dual_embedding(token_ids, topic_ids, token_weight, topic_weight).V);
}
void check_dual_embedding_bwd_(std::string_view devices, const Tensor& grad_out, const Tensor& token_ids,
                               const Tensor& topic_ids, const Tensor& token_weight,
                               const Tensor& topic_weight, int64_t padding_idx) {
  const StandIns s(devices, {&grad_out, &token_ids, &topic_ids, &token_weight, &topic_weight});
  check_dual_embedding_bwd(grad_out, token_ids, topic_ids, token_weight, topic_weight, padding_idx);
}
void check_lora_merge_fwd(std::string_view devices, const Tensor& weight, const Tensor& lora_a,
                          const Tensor& lora_b, const Tensor& scales) {
  const StandIns s(devices, {&weight, &lora_a, &lora_b, &scales});
  check_lora_merge(weight, lora_a, lora_b, scales, "lora_merge");
}
void check_lora_merge_inplace_(std::string_view devices, const Tensor& weight, const Tensor& lora_a,
                               const Tensor& lora_b, const Tensor& scales) {
  const StandIns s(devices, {&weight, &lora_a, &lora_b, &scales});
  check_lora_merge_inplace(weight, lora_a, lora_b, scales);
}
void check_lora_merge_bwd(std::string_view devices, const Tensor& grad_out, const Tensor& lora_a,
                          const Tensor& lora_b, const Tensor& scales) {
  const StandIns s(devices, {&grad_out, &lora_a, &lora_b, &scales});
  check_lora_merge(grad_out, lora_a, lora_b, scales, "lora_merge_bwd", "grad_out");
}
void check_multi_lora_linear_fwd(std::string_view devices, const Tensor& x, const Tensor& weight,
                                 const std::optional<Tensor>& bias, const Tensor& lora_a,
                                 const Tensor& lora_b, const Tensor& indices, const Tensor& scales) {
  const StandIns s(devices, {&x, &weight, opt(bias), &lora_a, &lora_b, &indices, &scales});
  check_multi_lora_linear(x, weight, bias, lora_a, lora_b, indices, scales);
}
void check_multi_lora_linear_bwd_(std::string_view devices, const Tensor& grad_out, const Tensor& x,
                                  const Tensor& weight, const Tensor& lora_a, const Tensor& lora_b,
                                  const Tensor& indices, const Tensor& scales, const Tensor& xa, bool,
                                  bool) {
  const StandIns s(devices, {&grad_out, &x, &weight, &lora_a, &lora_b, &indices, &scales, &xa});
  check_multi_lora_linear_bwd(grad_out, x, weight, lora_a, lora_b, indices, scales, xa);
}
void check_decode_linear_(std::string_view devices, const Tensor& x, const Tensor& weight,
                          const std::optional<Tensor>& bias) {
  const StandIns s(devices, {&x, &weight, opt(bias)});
  check_decode_linear(x, weight, bias);
}
void check_lean_qkv_(std::string_view devices, const Tensor& h, const Tensor& norm_weight, double, const Tensor& wq,
                     const std::optional<Tensor>& bq, const Tensor& wk, const std::optional<Tensor>& bk,
                     const Tensor& wv, const std::optional<Tensor>& bv, const Tensor& cos, const Tensor& sin) {
  const StandIns s(devices, {&h, &norm_weight, &wq, opt(bq), &wk, opt(bk), &wv, opt(bv), &cos, &sin});
  check_lean_qkv(h, norm_weight, wq, bq, wk, bk, wv, bv, cos, sin);
}
void check_lean_attention_(std::string_view devices, const Tensor& h, const Tensor& q, const Tensor& k,
                           const Tensor& v, const std::optional<Tensor>& mask, double, const Tensor& wo,
                           const std::optional<Tensor>& bo) {
  const StandIns s(devices, {&h, &q, &k, &v, opt(mask), &wo, opt(bo)});
  check_lean_attention(h, q, k, v, mask, wo, bo);
}
void check_lean_mlp_(std::string_view devices, const Tensor& h, const Tensor& norm_weight, double,
                     const Tensor& w_gate, const std::optional<Tensor>& b_gate, const Tensor& w_up,
                     const std::optional<Tensor>& b_up, const Tensor& w_down, const std::optional<Tensor>& b_down) {
  const StandIns s(devices, {&h, &norm_weight, &w_gate, opt(b_gate), &w_up, opt(b_up), &w_down, opt(b_down)});
  check_lean_mlp(h, norm_weight, w_gate, b_gate, w_up, b_up, w_down, b_down);
}

// An op and its check op, from one argument list: `name(args) -> returns` and
// `_check_name(str devices, args) -> ()` (alias annotations dropped: a check writes nothing).
void def_op(torch::stable::detail::StableLibrary& m, const std::string& name, const std::string& args,
            const std::string& returns) {
  m.def((name + "(" + args + ") -> " + returns).c_str());
  std::string plain = args;
  for (size_t at; (at = plain.find("(a!)")) != std::string::npos;) plain.erase(at, 4);
  m.def(("_check_" + name + "(str devices, " + plain + ") -> ()").c_str());
}

}  // namespace

STABLE_TORCH_LIBRARY(doe_ext, m) {
  m.def("_build_config() -> str");
  // DoE eq. 1-3: out = residual + softmax(q @ z_key.T * scale) @ z_value; lse per row (float32 for
  // half inputs) for the backward; probs [..., K] only when return_probs, else an empty tensor.
  // (The CPU wrapper asks for probs when a backward will follow: reusing them there saves a GEMM.)
  def_op(m, "knowledge_attention_fwd",
         "Tensor q, Tensor z_key, Tensor z_value, Tensor? residual, float scale, bool return_probs",
         "(Tensor out, Tensor lse, Tensor probs)");
  // Gradients of knowledge_attention_fwd's out w.r.t. q, z_key, z_value (residual's is grad_out);
  // probs from the forward, or empty to rebuild them from lse.
  def_op(m, "knowledge_attention_bwd",
         "Tensor grad_out, Tensor q, Tensor z_key, Tensor z_value, Tensor lse, Tensor probs, "
         "float scale",
         "(Tensor grad_q, Tensor grad_z_key, Tensor grad_z_value)");

  // ---- VAE-ReLU router and expert-label loss (CONTRACT §2.2, §2.4) ----
  // DoE §3.4 / App. A.3: mu_logvar = h @ [w_mu; w_logvar].T + [b_mu; b_logvar] (one GEMM), z = mu +
  // exp(logvar/2) * eps, logits = z @ w_gate.T + b_gate, gates = relu|softmax(logits), kl per token.
  // eps: `noise` when given, else Philox(rng = [key, stream] int64 on h's device), else 0 (eval).
  // z is the latent sample (for a decoder, App. H.3). Telemetry: block_counts [K] (rows with gate
  // k > 0), zero_rows [] (rows with every gate 0).
  def_op(m, "vae_relu_router_fwd",
         "Tensor h, Tensor w_mu, Tensor b_mu, Tensor w_logvar, Tensor b_logvar, Tensor w_gate, "
         "Tensor b_gate, Tensor? noise, Tensor? rng, bool training, str activation",
         "(Tensor gates, Tensor logits, Tensor kl, Tensor z, Tensor mu_logvar, Tensor block_counts, "
         "Tensor zero_rows)");
  // Gradients of vae_relu_router_fwd (any of the four output grads may be None); eps is
  // regenerated from rng, never stored.
  def_op(m, "vae_relu_router_bwd",
         "Tensor? grad_gates, Tensor? grad_logits, Tensor? grad_kl, Tensor? grad_z, Tensor h, "
         "Tensor w_mu, Tensor w_logvar, Tensor w_gate, Tensor mu_logvar, Tensor gates, Tensor logits, "
         "Tensor? noise, Tensor? rng, bool training, str activation",
         "(Tensor grad_h, Tensor grad_w_mu, Tensor grad_b_mu, Tensor grad_w_logvar, Tensor grad_b_logvar, "
         "Tensor grad_w_gate, Tensor grad_b_gate)");
  // DoE eq. 4 L_expert: cross-entropy to int64 labels (ignore_index, label_smoothing) or KL(t || softmax)
  // to float targets, one pass that also writes d(row loss)/d(logits) when keep_grad; weight is the
  // reduction's row factor (1/count for mean, 1 for sum/none, 0-safe).
  def_op(m, "expert_loss_fwd",
         "Tensor logits, Tensor target, int ignore_index, str reduction, float label_smoothing, "
         "bool keep_grad",
         "(Tensor loss, Tensor grad_rows, Tensor weight)");
  // grad_logits = grad_rows * grad_loss * weight, grad_loss broadcast over each row's K logits.
  def_op(m, "expert_loss_bwd",
         "Tensor grad_loss, Tensor grad_rows, Tensor weight",
         "Tensor");

  // ---- dual embedding and LoRA experts (CONTRACT §2.3, §2.5) ----
  // DoE §3.3 / Alg. 1: out = cat(token_weight[token_ids], topic_weight[topic_ids] (0 where -1), -1);
  // raises on an out-of-range id, naming token_ids or topic_ids. padding_idx (-1: none) only
  // matters to the backward; it is here, as in aten::embedding, so autograd can read it.
  def_op(m, "dual_embedding_fwd",
         "Tensor token_ids, Tensor topic_ids, Tensor token_weight, Tensor topic_weight, "
         "int padding_idx=-1",
         "Tensor");
  // Dense, deterministic gradients of both tables (ids sorted, runs reduced in token order; no
  // atomics); rows at padding_idx (>= 0) and topic ids -1 get none. The weights give shapes only.
  def_op(m, "dual_embedding_bwd",
         "Tensor grad_out, Tensor token_ids, Tensor topic_ids, Tensor token_weight, "
         "Tensor topic_weight, int padding_idx",
         "(Tensor grad_token_weight, Tensor grad_topic_weight)");
  // DMoE eq. 6, baking E experts into a weight: weight + sum_e scales[e] * lora_b[e] @ lora_a[e].
  def_op(m, "lora_merge",
         "Tensor weight, Tensor lora_a, Tensor lora_b, Tensor scales",
         "Tensor");
  // The same sum written into weight in place (export; no autograd).
  def_op(m, "lora_merge_",
         "Tensor(a!) weight, Tensor lora_a, Tensor lora_b, Tensor scales",
         "()");
  // Gradients of lora_merge w.r.t. lora_a, lora_b, scales (weight's is grad_out itself).
  def_op(m, "lora_merge_bwd",
         "Tensor grad_out, Tensor lora_a, Tensor lora_b, Tensor scales",
         "(Tensor grad_lora_a, Tensor grad_lora_b, Tensor grad_scales)");
  // Mixed-batch multi-LoRA linear: y[t] = x[t] @ weight.T + bias
  //   + sum_j [indices[t,j] >= 0] scales[t,j] * lora_b[i] @ (lora_a[i] @ x[t]),  i = indices[t, j].
  // xa [T, k, r] = lora_a[i] @ x[t] per slot (0 for empty slots), kept for the backward.
  def_op(m, "multi_lora_linear_fwd",
         "Tensor x, Tensor weight, Tensor? bias, Tensor lora_a, Tensor lora_b, Tensor indices, "
         "Tensor scales",
         "(Tensor out, Tensor xa)");
  // Gradients of multi_lora_linear_fwd's out; grad_weight/grad_bias only when need_weight_grad,
  // the LoRA and scale grads only when need_lora_grad (else empty tensors).
  def_op(m, "multi_lora_linear_bwd",
         "Tensor grad_out, Tensor x, Tensor weight, Tensor lora_a, Tensor lora_b, Tensor indices, "
         "Tensor scales, Tensor xa, bool need_weight_grad, bool need_lora_grad",
         "(Tensor grad_x, Tensor grad_weight, Tensor grad_bias, Tensor grad_lora_a, Tensor grad_lora_b, "
         "Tensor grad_scales)");
  // A decoding step's linear layer: x [M, in] @ weight.T + bias with the weight read once (few rows M).
  // Its gradients are plain GEMMs, composed in Python.
  def_op(m, "decode_linear", "Tensor x, Tensor weight, Tensor? bias", "Tensor");
  // The lean decoding step (doe_ext.nn.LeanDecoder), a Llama decoder layer for one token per sequence,
  // CPU only (float16/bfloat16 in float32), no autograd. lean_qkv: x = rms_norm(h) * norm_weight; q|k|v = x @ w.T + b, q and k rotated
  // (cos, sin [R, head_dim]); q [R, heads, 1, head_dim], k and v [R, kv_heads, 1, head_dim].
  def_op(m, "lean_qkv",
         "Tensor h, Tensor norm_weight, float eps, Tensor wq, Tensor? bq, Tensor wk, Tensor? bk, Tensor wv, "
         "Tensor? bv, Tensor cos, Tensor sin",
         "(Tensor q, Tensor k, Tensor v)");
  // h + SDPA(q, k, v; mask [R, T] true = attend, GQA) @ wo.T + bo, [R, d].
  def_op(m, "lean_attention",
         "Tensor h, Tensor q, Tensor k, Tensor v, Tensor? mask, float scale, Tensor wo, Tensor? bo", "Tensor");
  // h + (silu(x @ w_gate.T + b_gate) * (x @ w_up.T + b_up)) @ w_down.T + b_down, x = rms_norm(h) * norm_weight.
  def_op(m, "lean_mlp",
         "Tensor h, Tensor norm_weight, float eps, Tensor w_gate, Tensor? b_gate, Tensor w_up, Tensor? b_up, "
         "Tensor w_down, Tensor? b_down",
         "Tensor");

}

// The fake kernels' argument checks: torch.compile rejects what eager rejects, with the same message,
// because both run the same C++ check function.
STABLE_TORCH_LIBRARY_IMPL(doe_ext, CompositeExplicitAutograd, m) {
  m.impl("_build_config", TORCH_BOX(&build_config));
  m.impl("_check_knowledge_attention_fwd", TORCH_BOX(&check_knowledge_attention_fwd));
  m.impl("_check_knowledge_attention_bwd", TORCH_BOX(&check_knowledge_attention_bwd_));
  m.impl("_check_vae_relu_router_fwd", TORCH_BOX(&check_vae_relu_router_fwd));
  m.impl("_check_vae_relu_router_bwd", TORCH_BOX(&check_vae_relu_router_bwd));
  m.impl("_check_expert_loss_fwd", TORCH_BOX(&check_expert_loss_fwd));
  m.impl("_check_expert_loss_bwd", TORCH_BOX(&check_expert_loss_bwd_));
  m.impl("_check_dual_embedding_fwd", TORCH_BOX(&check_dual_embedding_fwd));
  m.impl("_check_dual_embedding_bwd", TORCH_BOX(&check_dual_embedding_bwd_));
  m.impl("_check_lora_merge", TORCH_BOX(&check_lora_merge_fwd));
  m.impl("_check_lora_merge_", TORCH_BOX(&check_lora_merge_inplace_));
  m.impl("_check_lora_merge_bwd", TORCH_BOX(&check_lora_merge_bwd));
  m.impl("_check_multi_lora_linear_fwd", TORCH_BOX(&check_multi_lora_linear_fwd));
  m.impl("_check_multi_lora_linear_bwd", TORCH_BOX(&check_multi_lora_linear_bwd_));
  m.impl("_check_decode_linear", TORCH_BOX(&check_decode_linear_));
  m.impl("_check_lean_qkv", TORCH_BOX(&check_lean_qkv_));
  m.impl("_check_lean_attention", TORCH_BOX(&check_lean_attention_));
  m.impl("_check_lean_mlp", TORCH_BOX(&check_lean_mlp_));
}

}  // namespace doe_ext

// `import doe_ext._C` loads this library (and so registers the ops); it has no Python functions.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
