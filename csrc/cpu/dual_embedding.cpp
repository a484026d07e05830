// CPU dual embedding (DoE §3.3, Algorithm 1), forward and a deterministic backward.
//
// Forward: one pass over the tokens, each output row written once ([token row | topic row or 0]).
// Backward: a counting sort of the ids (stable, so each id's tokens stay in token order), then one
// pass over the rows of each gradient table, in parallel over rows: a row is the sum of its run of
// grad_out rows, added in token order, or zero. No two threads write one row and the order of the
// additions does not depend on the thread count, so the gradients are bitwise reproducible; each
// table row is written exactly once (no separate zero fill, unlike index_put_ on a zeros tensor).
#include "doe_ext/tensor.h"

#include <sys/mman.h>

#include <cstdint>
#include <vector>

#include "doe_ext/dual_embedding.h"

namespace doe_ext {
namespace {

// The shared row math, compiled per ISA (float: the hot case; double: gradcheck).
DOE_CLONES void add_row(float* dst, const float* src, int64_t width) { de::add_row(dst, src, width); }
void add_row(double* dst, const double* src, int64_t width) { de::add_row(dst, src, width); }

// A [rows, width] gradient table. Large ones (a vocabulary's dense gradient, tens of MiB, fresh
// on every backward) are marked for transparent huge pages before anything touches them: the
// kernel then maps them in 2 MiB faults instead of 4 KiB ones, and the first touch, which is most
// of this backward's time, gets cheaper. The advice covers the table's 2 MiB-aligned interior
// (torch's allocator aligns to 64 bytes only) and is ignored where THP is off.
Tensor grad_table(int64_t rows, int64_t width, const TensorOptions& options) {
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  auto t = empty({rows, width}, options);
  const uintptr_t begin = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t end = begin + static_cast<uintptr_t>(t.numel()) * t.element_size();
  const uintptr_t lo = (begin + kHuge - 1) / kHuge * kHuge, hi = end / kHuge * kHuge;
  if (hi >= lo + 4 * kHuge) madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);
  return t;
}

// Flat, contiguous int64 ids.
Tensor flat_ids(const Tensor& ids) { return ids.reshape({-1}).contiguous(); }

// Raises (naming the argument) at the first id out of range (a token id first at one position), as
// on CUDA. Reads the ids in place: called before anything of their size is allocated or copied.
void validate_ids(const Tensor& token_ids, const Tensor& topic_ids, int64_t V, int64_t K) {
  const auto tok = first_bad_id(token_ids, [V](int64_t id) { return !de::token_id_ok(id, V); });
  const auto top = first_bad_id(topic_ids, [K](int64_t id) { return !de::topic_id_ok(id, K); },
                                tok.position >= 0 ? tok.position : std::numeric_limits<int64_t>::max());
  if (tok.position >= 0 && (top.position < 0 || tok.position <= top.position))
    fail_dual_embedding_id(false, tok.position, tok.value, V);
  if (top.position >= 0) fail_dual_embedding_id(true, top.position, top.value, K);
}

// Counting sort of token positions by id (ids in [0, rows); negative ids are skipped): on return
// pos[offsets[r] .. offsets[r+1]) are the positions holding id r, in increasing order.
void sort_positions(const int64_t* ids, int64_t N, int64_t rows, std::vector<int64_t>& offsets,
                    std::vector<int64_t>& pos) {
  offsets.assign(rows + 1, 0);
  for (int64_t i = 0; i < N; ++i)
    if (ids[i] >= 0) ++offsets[ids[i] + 1];
  for (int64_t r = 0; r < rows; ++r) offsets[r + 1] += offsets[r];
  pos.resize(offsets[rows]);
  std::vector<int64_t> next(offsets.begin(), offsets.end() - 1);
  for (int64_t i = 0; i < N; ++i)
    if (ids[i] >= 0) pos[next[ids[i]]++] = i;
}

// grad_table[r] = sum of g[pos, col0 : col0 + width] over r's run (token order); zero for empty
// runs and for the row skip (padding_idx). Parallel over rows: each row has one writer.
template <typename T>
void reduce_runs(const T* g, int64_t ld, int64_t col0, int64_t width, const std::vector<int64_t>& offsets,
                 const std::vector<int64_t>& pos, int64_t skip, T* grad_table) {
  const int64_t rows = static_cast<int64_t>(offsets.size()) - 1;
  torch::stable::parallel_for(0, rows, 256, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      T* dst = grad_table + r * width;
      de::copy_row<T>(dst, nullptr, 0, width, 1);
      if (r == skip) continue;
      for (int64_t i = offsets[r]; i < offsets[r + 1]; ++i) add_row(dst, g + pos[i] * ld + col0, width);
    }
  });
}

Tensor dual_embedding_fwd_cpu(const Tensor& token_ids, const Tensor& topic_ids,
                              const Tensor& token_weight, const Tensor& topic_weight,
                              int64_t padding_idx) {
  const auto sz = check_dual_embedding(token_ids, topic_ids, token_weight, topic_weight);
  check_padding_idx(padding_idx, sz.V);
  validate_ids(token_ids, topic_ids, sz.V, sz.K);
  auto shape = token_ids.sizes().vec();
  shape.push_back(sz.d + sz.dk);
  auto out = empty(shape, token_weight.options());
  if (sz.N == 0) return out;
  const auto tok = flat_ids(token_ids), top = flat_ids(topic_ids);
  const int64_t* tp = tok.data_ptr<int64_t>();
  const int64_t* kp = top.data_ptr<int64_t>();
  // The tables are read by stride, never copied: an expanded or strided table costs nothing extra.
  const int64_t width = sz.d + sz.dk;
  const int64_t ts0 = token_weight.stride(0), ts1 = token_weight.stride(1);
  const int64_t ks0 = topic_weight.stride(0), ks1 = topic_weight.stride(1);
  DOE_DISPATCH_FLOATING_AND_HALF_TYPES(token_weight.scalar_type(), "dual_embedding_fwd_cpu", [&] {
    const scalar_t* twp = token_weight.const_data_ptr<scalar_t>();
    const scalar_t* kwp = topic_weight.const_data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    torch::stable::parallel_for(0, sz.N, 64, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        scalar_t* row = op + i * width;
        const scalar_t* t = twp + tp[i] * ts0;
        for (int64_t c = 0; c < sz.d; ++c) row[c] = t[c * ts1];
        if (kp[i] >= 0) {
          const scalar_t* k = kwp + kp[i] * ks0;
          for (int64_t c = 0; c < sz.dk; ++c) row[sz.d + c] = k[c * ks1];
        } else {
          de::copy_row<scalar_t>(row + sz.d, nullptr, 0, sz.dk, 1);
        }
      }
    });
  });
  return out;
}

std::tuple<Tensor, Tensor> dual_embedding_bwd_cpu(const Tensor& grad_out, const Tensor& token_ids,
                                                  const Tensor& topic_ids, const Tensor& token_weight,
                                                  const Tensor& topic_weight, int64_t padding_idx) {
  const auto sz = check_dual_embedding_bwd(grad_out, token_ids, topic_ids, token_weight, topic_weight, padding_idx);
  validate_ids(token_ids, topic_ids, sz.V, sz.K);
  // float16 / bfloat16: the runs are summed into float32 tables, rounded once at the end.
  const auto dt = token_weight.scalar_type();
  const auto acc = token_weight.options().dtype(is_half(token_weight) ? kFloat : dt);
  auto grad_tok = grad_table(sz.V, sz.d, acc);
  auto grad_top = grad_table(sz.K, sz.dk, acc);
  const auto tok = flat_ids(token_ids), top = flat_ids(topic_ids);
  std::vector<int64_t> tok_off, tok_pos, top_off, top_pos;
  sort_positions(tok.data_ptr<int64_t>(), sz.N, sz.V, tok_off, tok_pos);
  sort_positions(top.data_ptr<int64_t>(), sz.N, sz.K, top_off, top_pos);  // -1 (no label) skipped
  const auto g = up(grad_out.reshape({sz.N, sz.d + sz.dk}).contiguous());
  DOE_DISPATCH_FLOATING_TYPES(g.scalar_type(), "dual_embedding_bwd_cpu", [&] {
    const scalar_t* gp = g.data_ptr<scalar_t>();
    reduce_runs<scalar_t>(gp, sz.d + sz.dk, 0, sz.d, tok_off, tok_pos, padding_idx, grad_tok.data_ptr<scalar_t>());
    reduce_runs<scalar_t>(gp, sz.d + sz.dk, sz.d, sz.dk, top_off, top_pos, -1, grad_top.data_ptr<scalar_t>());
  });
  if (dt != grad_tok.scalar_type()) return {grad_tok.to(dt), grad_top.to(dt)};
  return {grad_tok, grad_top};
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(doe_ext, CPU, m) {
  m.impl("dual_embedding_fwd", TORCH_BOX(&dual_embedding_fwd_cpu));
  m.impl("dual_embedding_bwd", TORCH_BOX(&dual_embedding_bwd_cpu));
}

}  // namespace doe_ext
