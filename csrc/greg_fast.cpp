// Fused growing-regularization step for CPU tensors: one call for all layers.
//
// Every layer's weight is viewed as [A, G, B] (groups on the middle axis; see LayerPlan.view).
// One pass per element: read w and grad, write grad (penalty) — or, fused with SGD, read w, grad
// and momentum, write w and momentum. Group scores (mean |w|) come out of the same pass.
// Work items are (layer, block of groups) so that one item owns its groups across A and B and the
// scores need no atomics; items run in parallel (at::parallel_for: OpenMP, torch's thread count).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

namespace greg_fast {
namespace {

enum class Mode { Scores, Penalty, FusedSGD };

struct Layer {
  at::ScalarType dtype;
  void* w;
  void* g;
  void* buf;           // momentum buffer or nullptr
  const bool* kept;    // [G]
  int64_t A, G, B;
  float lam_kept, lam_selected, lr, momentum, weight_decay;
  float* scores;       // [G] or nullptr
};

struct Item {
  int64_t layer, g0, g1;
};

constexpr int64_t kItemElements = 1 << 16;  // ~256 KB of fp32 weights per work item

template <typename T>
void run_item(const Layer& L, int64_t g0, int64_t g1, Mode mode, bool mask) {
  T* __restrict w = static_cast<T*>(L.w);
  T* __restrict g = static_cast<T*>(L.g);
  T* __restrict buf = static_cast<T*>(L.buf);
  const float lr = L.lr, mu = L.momentum, wd = L.weight_decay;
  std::vector<float> acc(L.scores ? g1 - g0 : 0, 0.f);
  for (int64_t a = 0; a < L.A; ++a) {
    for (int64_t gi = g0; gi < g1; ++gi) {
      const int64_t base = (a * L.G + gi) * L.B;
      const bool keep = L.kept == nullptr || L.kept[gi];
      const float lam = keep ? L.lam_kept : L.lam_selected;
      const bool zero = mask && !keep;
      float s = 0.f;
      if (mode == Mode::Scores) {
#pragma omp simd reduction(+ : s)
        for (int64_t b = 0; b < L.B; ++b) s += std::abs(static_cast<float>(w[base + b]));
      } else if (mode == Mode::Penalty) {
        if (zero) {
          for (int64_t b = 0; b < L.B; ++b) w[base + b] = T(0), g[base + b] = T(0);
        } else {
#pragma omp simd reduction(+ : s)
          for (int64_t b = 0; b < L.B; ++b) {
            const float wv = static_cast<float>(w[base + b]);
            s += std::abs(wv);
            g[base + b] = static_cast<T>(static_cast<float>(g[base + b]) + wv * lam);
          }
        }
      } else {  // FusedSGD, in torch.optim.SGD's order: d = (g + λw) + wd·w; m = μm + d; w -= lr·m
        if (zero) {
          for (int64_t b = 0; b < L.B; ++b) {
            w[base + b] = T(0);
            if (buf) buf[base + b] = T(0);
          }
        } else if (buf) {
#pragma omp simd reduction(+ : s)
          for (int64_t b = 0; b < L.B; ++b) {
            const float wv = static_cast<float>(w[base + b]);
            s += std::abs(wv);
            float d = static_cast<float>(g[base + b]) + wv * lam;
            d = d + wv * wd;
            const T m = static_cast<T>(static_cast<float>(buf[base + b]) * mu + d);
            buf[base + b] = m;
            w[base + b] = static_cast<T>(wv - lr * static_cast<float>(m));
          }
        } else {
#pragma omp simd reduction(+ : s)
          for (int64_t b = 0; b < L.B; ++b) {
            const float wv = static_cast<float>(w[base + b]);
            s += std::abs(wv);
            float d = static_cast<float>(g[base + b]) + wv * lam;
            d = d + wv * wd;
            w[base + b] = static_cast<T>(wv - lr * d);
          }
        }
      }
      if (L.scores) acc[gi - g0] += s;
    }
  }
  if (L.scores) {
    const float n = static_cast<float>(L.A * L.B);
    for (int64_t gi = g0; gi < g1; ++gi) L.scores[gi] = acc[gi - g0] / n;
  }
}

void run(std::vector<Layer>& layers, Mode mode, bool mask) {
  std::vector<Item> items;
  for (int64_t i = 0; i < static_cast<int64_t>(layers.size()); ++i) {
    const Layer& L = layers[i];
    const int64_t per = std::max<int64_t>(1, kItemElements / std::max<int64_t>(1, L.A * L.B));
    for (int64_t g0 = 0; g0 < L.G; g0 += per) items.push_back({i, g0, std::min(L.G, g0 + per)});
  }
  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      const Item& it = items[k];
      const Layer& L = layers[it.layer];
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, L.dtype, "greg_fast_step",
                                      [&] { run_item<scalar_t>(L, it.g0, it.g1, mode, mask); });
    }
  });
}

void check_tensor(const at::Tensor& t, const char* what, int64_t i, const at::Tensor& like) {
  TORCH_CHECK(t.device().is_cpu(), what, "[", i, "] must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.is_contiguous(), what, "[", i, "] must be contiguous");
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), what, "[", i, "] has dtype ", t.scalar_type(),
              " but the weight has ", like.scalar_type());
  TORCH_CHECK(t.numel() == like.numel(), what, "[", i, "] has ", t.numel(), " elements, the weight ", like.numel());
}

std::vector<Layer> make_layers(at::TensorList weights, at::IntArrayRef views, const at::Tensor& scores) {
  const int64_t n = weights.size();
  TORCH_CHECK(static_cast<int64_t>(views.size()) == 3 * n, "views must hold 3 ints per layer");
  int64_t total_groups = 0;
  for (int64_t i = 0; i < n; ++i) total_groups += views[3 * i + 1];
  const bool want_scores = scores.numel() > 0;
  if (want_scores) {
    TORCH_CHECK(scores.scalar_type() == at::kFloat && scores.is_contiguous() && scores.device().is_cpu(),
                "scores must be a contiguous fp32 CPU tensor");
    TORCH_CHECK(scores.numel() == total_groups, "scores must have ", total_groups, " elements (all groups)");
  }
  std::vector<Layer> layers(n);
  int64_t offset = 0;
  for (int64_t i = 0; i < n; ++i) {
    const at::Tensor& w = weights[i];
    check_tensor(w, "weights", i, w);
    const int64_t A = views[3 * i], G = views[3 * i + 1], B = views[3 * i + 2];
    TORCH_CHECK(A * G * B == w.numel(), "views[", i, "] = [", A, ", ", G, ", ", B, "] does not cover the ",
                w.numel(), " elements of weights[", i, "]");
    layers[i] = Layer{w.scalar_type(), w.data_ptr(), nullptr, nullptr, nullptr, A, G, B,
                      0.f, 0.f, 0.f, 0.f, 0.f, want_scores ? scores.data_ptr<float>() + offset : nullptr};
    offset += G;
  }
  return layers;
}

void set_penalty(std::vector<Layer>& layers, at::TensorList grads, at::TensorList kept,
                 const at::Tensor& lam_kept, const at::Tensor& lam_selected, at::TensorList weights) {
  const int64_t n = layers.size();
  TORCH_CHECK(static_cast<int64_t>(grads.size()) == n && static_cast<int64_t>(kept.size()) == n,
              "weights, grads and kept must have one entry per layer");
  for (const auto* lam : {&lam_kept, &lam_selected}) {
    TORCH_CHECK(lam->scalar_type() == at::kFloat && lam->is_contiguous() && lam->device().is_cpu() &&
                    lam->numel() == n, "lam_kept and lam_selected must be fp32 CPU tensors of ", n, " elements");
  }
  const float* lk = lam_kept.data_ptr<float>();
  const float* ls = lam_selected.data_ptr<float>();
  for (int64_t i = 0; i < n; ++i) {
    check_tensor(grads[i], "grads", i, weights[i]);
    TORCH_CHECK(kept[i].scalar_type() == at::kBool && kept[i].is_contiguous() && kept[i].device().is_cpu() &&
                    kept[i].numel() == layers[i].G, "kept[", i, "] must be a CPU bool tensor of ", layers[i].G,
                " elements");
    layers[i].g = grads[i].data_ptr();
    layers[i].kept = kept[i].data_ptr<bool>();
    layers[i].lam_kept = lk[i];
    layers[i].lam_selected = ls[i];
  }
}

void scores_(at::TensorList weights, at::IntArrayRef views, const at::Tensor& scores) {
  TORCH_CHECK(scores.numel() > 0 || weights.empty(), "scores_ needs an output tensor");
  auto layers = make_layers(weights, views, scores);
  run(layers, Mode::Scores, false);
}

void penalty_(at::TensorList weights, at::TensorList grads, at::TensorList kept, const at::Tensor& lam_kept,
              const at::Tensor& lam_selected, at::IntArrayRef views, bool mask, const at::Tensor& scores) {
  auto layers = make_layers(weights, views, scores);
  set_penalty(layers, grads, kept, lam_kept, lam_selected, weights);
  run(layers, Mode::Penalty, mask);
}

void fused_sgd_(at::TensorList weights, at::TensorList grads, at::TensorList momentum_buffers,
                at::TensorList kept, const at::Tensor& lam_kept, const at::Tensor& lam_selected,
                at::ArrayRef<double> lr, at::ArrayRef<double> momentum, at::ArrayRef<double> weight_decay,
                at::IntArrayRef views, bool mask, const at::Tensor& scores) {
  auto layers = make_layers(weights, views, scores);
  set_penalty(layers, grads, kept, lam_kept, lam_selected, weights);
  const size_t n = layers.size();
  TORCH_CHECK(momentum_buffers.size() == n && lr.size() == n && momentum.size() == n && weight_decay.size() == n,
              "momentum_buffers, lr, momentum and weight_decay must have one entry per layer");
  for (size_t i = 0; i < n; ++i) {
    if (momentum_buffers[i].numel() > 0) {  // an empty tensor: plain SGD for this layer
      check_tensor(momentum_buffers[i], "momentum_buffers", i, weights[i]);
      layers[i].buf = momentum_buffers[i].data_ptr();
    }
    layers[i].lr = static_cast<float>(lr[i]);
    layers[i].momentum = static_cast<float>(momentum[i]);
    layers[i].weight_decay = static_cast<float>(weight_decay[i]);
  }
  run(layers, Mode::FusedSGD, mask);
}

}  // namespace

TORCH_LIBRARY(greg_fast, m) {
  m.def("scores_(Tensor[] weights, int[] views, Tensor(a!) scores) -> ()");
  m.def("penalty_(Tensor(a!)[] weights, Tensor(b!)[] grads, Tensor[] kept, Tensor lam_kept, "
        "Tensor lam_selected, int[] views, bool mask, Tensor(c!) scores) -> ()");
  m.def("fused_sgd_(Tensor(a!)[] weights, Tensor[] grads, Tensor(b!)[] momentum_buffers, Tensor[] kept, "
        "Tensor lam_kept, Tensor lam_selected, float[] lr, float[] momentum, float[] weight_decay, int[] views, "
        "bool mask, Tensor(c!) scores) -> ()");
}

TORCH_LIBRARY_IMPL(greg_fast, CPU, m) {
  m.impl("scores_", &scores_);
  m.impl("penalty_", &penalty_);
  m.impl("fused_sgd_", &fused_sgd_);
}

}  // namespace greg_fast

// Importing greg_fast._C registers the ops above (torch.ops.greg_fast.*).
#include <Python.h>
static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module); }
