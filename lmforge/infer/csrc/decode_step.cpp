// One decode step of a plain decoder-only Transformer (Llama / GPT-2 families) in C++.
//
// Decoding a token on a CPU runs ~25 small tensor ops per layer around the matmuls. From Python
// each costs 5-10 us of interpreter and module overhead on top of ATen's own dispatch, which on
// SmolLM2-135M (30 layers) is ~4 ms of a ~9 ms int4 step (benchmarks/quant_decode.py). This file
// issues the same ATen ops from C++, so what is left is ATen's dispatch and the kernels: the
// arithmetic is the Python model's (lmforge/model), op for op, so results match it to fp32
// rounding. The Python side (lmforge/infer/fast_decode.py) decides which models qualify and
// hands over the weights once.

#include <torch/extension.h>

#include <ATen/core/dispatch/Dispatcher.h>

#include <optional>
#include <string_view>
#include <vector>

namespace {

// fp32 products go through oneDNN, as lmforge.model.layers.Linear does (2x MKL's speed for the
// one-row products of decoding on the project's CPU).
at::Tensor onednn_linear(const at::Tensor& x, const at::Tensor& w,
                         const std::optional<at::Tensor>& b) {
  static auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("mkldnn::_linear_pointwise", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                            std::string_view, c10::List<std::optional<at::Scalar>>,
                            std::optional<std::string_view>)>();
  return op.call(x, w, b, "none", c10::List<std::optional<at::Scalar>>(), std::nullopt);
}

// A linear layer as the Python side describes it. kind: "fp32" (weight, bias), "int8"
// (int8 codes, bf16 per-row scale) or "int4" (tinygemm-packed codes, bf16 scale+zero per group).
// The weight-only kernels take bf16 activations (lmforge/compress/qlinear.py says why).
struct Linear {
  int kind = 0;  // 0 fp32, 1 int8, 2 int4
  at::Tensor w, s;
  std::optional<at::Tensor> b;
  int64_t group = 0;

  at::Tensor operator()(const at::Tensor& x) const {
    at::Tensor y;
    if (kind == 0) return onednn_linear(x, w, b);
    auto xb = x.to(at::kBFloat16);
    if (kind == 1) {
      y = at::_weight_int8pack_mm(xb, w, s);
    } else {
      y = at::_weight_int4pack_mm_for_cpu(xb, w, group, s);
    }
    y = y.to(at::kFloat);
    return b ? y.add_(*b) : y;
  }
};

struct Norm {
  bool rms = true;
  at::Tensor w;
  std::optional<at::Tensor> b;
  double eps = 1e-5;
  at::Tensor operator()(const at::Tensor& x) const {
    if (rms) return at::rms_norm(x, {w.size(0)}, w, eps);
    return at::layer_norm(x, {w.size(0)}, w, b, eps);
  }
};

struct Layer {
  Norm attn_norm, mlp_norm;
  Linear qkv, out, w_in, w_out;
};

enum Act { SILU = 0, GELU = 1, GELU_TANH = 2, RELU = 3 };

at::Tensor activate(const at::Tensor& x, int64_t act) {
  switch (act) {
    case SILU: return at::silu(x);
    case GELU: return at::gelu(x);
    case GELU_TANH: return at::gelu(x, "tanh");
    default: return at::relu(x);
  }
}

class DecodeStep {
 public:
  DecodeStep(int64_t n_heads, int64_t kv_heads, int64_t head_dim, int64_t act, bool gated,
             at::Tensor embed, std::optional<at::Tensor> pos_embed,
             std::optional<at::Tensor> rope_cos, std::optional<at::Tensor> rope_sin)
      : H_(n_heads), KV_(kv_heads), D_(head_dim), act_(act), gated_(gated),
        embed_(std::move(embed)), pos_embed_(std::move(pos_embed)),
        cos_(std::move(rope_cos)), sin_(std::move(rope_sin)) {}

  static Linear make_linear(int64_t kind, at::Tensor w, at::Tensor s, std::optional<at::Tensor> b,
                            int64_t group) {
    Linear l;
    l.kind = static_cast<int>(kind);
    l.w = std::move(w);
    l.s = std::move(s);
    l.b = std::move(b);
    l.group = group;
    return l;
  }

  // Linear layers as (kind, weight, scale, bias, group); norms as (rms, weight, bias, eps).
  void add_layer(bool rms, at::Tensor attn_w, std::optional<at::Tensor> attn_b,
                 at::Tensor mlp_w, std::optional<at::Tensor> mlp_b, double eps,
                 std::vector<std::tuple<int64_t, at::Tensor, at::Tensor, std::optional<at::Tensor>,
                                        int64_t>> linears) {
    TORCH_CHECK(linears.size() == 4, "a layer has 4 linear layers (qkv, out, w_in, w_out)");
    Layer layer;
    layer.attn_norm = Norm{rms, std::move(attn_w), std::move(attn_b), eps};
    layer.mlp_norm = Norm{rms, std::move(mlp_w), std::move(mlp_b), eps};
    Linear* slots[4] = {&layer.qkv, &layer.out, &layer.w_in, &layer.w_out};
    for (size_t i = 0; i < 4; ++i) {
      auto& [kind, w, s, b, group] = linears[i];
      *slots[i] = make_linear(kind, w, s, b, group);
    }
    layers_.push_back(std::move(layer));
  }

  void set_output(bool rms, at::Tensor norm_w, std::optional<at::Tensor> norm_b, double eps,
                  int64_t kind, at::Tensor w, at::Tensor s, std::optional<at::Tensor> b,
                  int64_t group) {
    norm_ = Norm{rms, std::move(norm_w), std::move(norm_b), eps};
    head_ = make_linear(kind, std::move(w), std::move(s), std::move(b), group);
  }

  // tokens (B,) int64; lengths: filled positions of each row's slot (host ints); k_cache and
  // v_cache (n_layers, slots, KV, max_len, D); rows are slots [start, start + B). Writes the
  // new keys/values at each row's length and returns (B, vocab) logits. The caller advances
  // the lengths.
  at::Tensor step(const at::Tensor& tokens, const std::vector<int64_t>& lengths,
                  const at::Tensor& k_cache, const at::Tensor& v_cache, int64_t start) {
    const int64_t B = tokens.size(0);
    TORCH_CHECK(static_cast<int64_t>(lengths.size()) == B, "one length per token");
    int64_t longest = 0;
    bool uniform = true;
    for (auto n : lengths) {
      longest = std::max(longest, n);
      uniform = uniform && n == lengths[0];
    }
    const int64_t window = longest + 1;
    TORCH_CHECK(window <= k_cache.size(3), "the KV cache is full (", window, " > ",
                k_cache.size(3), " positions)");
    auto positions = at::tensor(lengths, tokens.options().dtype(at::kLong));

    at::Tensor x = at::embedding(embed_, tokens);  // (B, d)
    if (pos_embed_) x = x + at::embedding(*pos_embed_, positions);
    at::Tensor cos, sin;
    if (cos_) {  // (B, 1, 1, D): one row of each table per sequence
      cos = cos_->index_select(0, positions).view({B, 1, 1, D_});
      sin = sin_->index_select(0, positions).view({B, 1, 1, D_});
    }
    // Rows of different lengths attend to their own past only: key j is visible to row b iff
    // j <= lengths[b] (the new key sits at lengths[b]). One length needs no mask at all.
    std::optional<at::Tensor> mask;
    if (!uniform) {
      auto keys = at::arange(window, positions.options());
      mask = keys.view({1, 1, 1, window}).le(positions.view({B, 1, 1, 1}));
    }
    const int64_t half = D_ / 2;
    for (size_t i = 0; i < layers_.size(); ++i) {
      const Layer& L = layers_[i];
      // (B, H + 2KV, 1, D) view of the fused projection; q and k heads are adjacent.
      auto qkv = L.qkv(L.attn_norm(x)).view({B, H_ + 2 * KV_, 1, D_});
      auto qk = qkv.narrow(1, 0, H_ + KV_);
      auto v = qkv.narrow(1, H_ + KV_, KV_);
      if (cos_) {  // rotate half: [x1, x2] -> [x1 cos - x2 sin, x2 cos + x1 sin] (signed sin)
        auto swapped = at::cat({qk.narrow(3, half, half), qk.narrow(3, 0, half)}, 3);
        qk = at::addcmul(qk * cos, swapped, sin);
      }
      auto q = qk.narrow(1, 0, H_);
      auto k = qk.narrow(1, H_, KV_);
      auto keys = k_cache.select(0, i).narrow(0, start, B);
      auto values = v_cache.select(0, i).narrow(0, start, B);
      if (uniform) {
        keys.narrow(2, lengths[0], 1).copy_(k);
        values.narrow(2, lengths[0], 1).copy_(v);
      } else {
        for (int64_t r = 0; r < B; ++r) {
          keys.select(0, r).narrow(1, lengths[r], 1).copy_(k.select(0, r));
          values.select(0, r).narrow(1, lengths[r], 1).copy_(v.select(0, r));
        }
      }
      auto y = at::scaled_dot_product_attention(q, keys.narrow(2, 0, window),
                                                values.narrow(2, 0, window), mask, 0.0, false,
                                                std::nullopt, KV_ != H_);
      x = x + L.out(y.reshape({B, H_ * D_}));
      auto h = L.w_in(L.mlp_norm(x));
      if (gated_) {
        auto parts = h.chunk(2, -1);
        h = activate(parts[0], act_) * parts[1];
      } else {
        h = activate(h, act_);
      }
      x = x + L.w_out(h);
    }
    return head_(norm_(x));
  }

 private:
  int64_t H_, KV_, D_, act_;
  bool gated_;
  at::Tensor embed_;
  std::optional<at::Tensor> pos_embed_, cos_, sin_;
  std::vector<Layer> layers_;
  Norm norm_;
  Linear head_;
};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  pybind11::class_<DecodeStep>(m, "DecodeStep")
      .def(pybind11::init<int64_t, int64_t, int64_t, int64_t, bool, at::Tensor,
                          std::optional<at::Tensor>, std::optional<at::Tensor>,
                          std::optional<at::Tensor>>())
      .def("add_layer", &DecodeStep::add_layer)
      .def("set_output", &DecodeStep::set_output)
      .def("step", &DecodeStep::step, pybind11::call_guard<pybind11::gil_scoped_release>());
}
