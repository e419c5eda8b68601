// greg_fast's CPU ops: the fused growing-regularization step for all layers in one call, the
// gathers of physical compaction, and the packing of unstructured sparse weights.
//
// Every layer's weight is viewed as [A, G, B] (groups on the middle axis; see LayerPlan.view).
// One pass per element: read w and grad, write grad (penalty) — or, fused with SGD, read w, grad
// and momentum, write w and momentum. Group scores (mean |w|) come out of the same pass. Groups
// whose λ is 0 (GReg-1's kept groups) are not touched by the penalty at all: w is read only when
// scores are wanted, the gradient never.
// Work items are (layer, block of groups) so that one item owns its groups across A and B and the
// scores need no atomics; items run in parallel (at::parallel_for: OpenMP, torch's thread count).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

namespace greg_fast {
namespace {

enum class Mode { Scores, Penalty, FusedSGD };

struct Layer {
  at::ScalarType dtype;
  void* w;
  void* g;
  void* buf;           // momentum buffer or nullptr
  const bool* kept;    // [G], or
  const uint8_t* kept_bits;  // [ceil(G / 8)]: unstructured layers, bit k of byte b is group 8b + k
  int64_t A, G, B;
  int64_t sA;          // elements from one row of A to the next: G * B, or more for a run of columns
  float lam_kept, lam_selected, lr, momentum, weight_decay;
  float* scores;       // [G] or nullptr
};

struct Item {
  int64_t layer, g0, g1;
  int64_t a0, a1;  // rows of A (all of them unless the item is a block of rows, see run)
};

constexpr int64_t kItemElements = 1 << 16;  // ~256 KB of fp32 weights per work item

constexpr int64_t kShortGroup = 16;          // groups of fewer elements: the row walk below

inline bool kept_at(const Layer& L, int64_t gi) {
  return L.kept_bits ? ((L.kept_bits[gi >> 3] >> (gi & 7)) & 1) : (L.kept == nullptr || L.kept[gi]);
}

// The penalty over short groups (1x1 and 3x3 columns of a consumer, channel groups): per group the
// inner loop would be 1 to 9 elements long, all branch and no vector. Instead each row of A is one
// contiguous run of (g1 - g0) * B elements with a per-element λ and keep flag, built once per item;
// kept groups at λ = 0 are rewritten unchanged (g + 0·w), a little traffic for a loop without branches.
template <typename T>
void run_rows(const Layer& L, int64_t g0, int64_t g1, int64_t a0, int64_t a1, bool mask) {
  T* __restrict w = static_cast<T*>(L.w);
  T* __restrict g = static_cast<T*>(L.g);
  const int64_t n = (g1 - g0) * L.B;
  std::vector<float> lam(n), keep(n), acc(L.scores ? n : 0, 0.f);  // keep: 1 or 0, floats so selects vectorize
  for (int64_t gi = g0; gi < g1; ++gi) {
    const bool k = kept_at(L, gi), zero = mask && !k;
    for (int64_t b = 0; b < L.B; ++b) {
      lam[(gi - g0) * L.B + b] = zero ? 0.f : (k ? L.lam_kept : L.lam_selected);
      keep[(gi - g0) * L.B + b] = zero ? 0.f : 1.f;
    }
  }
  const float* __restrict l = lam.data();
  const float* __restrict kp = keep.data();
  float* __restrict s = acc.data();
  for (int64_t a = a0; a < a1; ++a) {
    T* __restrict wr = w + a * L.sA + g0 * L.B;
    T* __restrict gr = g + a * L.sA + g0 * L.B;
    if (L.scores) {
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) s[j] += std::abs(static_cast<float>(wr[j]));
    }
#pragma omp simd
    for (int64_t j = 0; j < n; ++j)
      gr[j] = static_cast<T>(static_cast<float>(gr[j]) + static_cast<float>(wr[j]) * l[j]);
    if (mask) {  // a loop of its own: a select of a computed value does not vectorize (trapping math)
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) {
        gr[j] = kp[j] != 0.f ? gr[j] : T(0);
        wr[j] = kp[j] != 0.f ? wr[j] : T(0);
      }
    }
  }
  if (L.scores) {
    const float count = static_cast<float>(L.A * L.B);
    for (int64_t gi = g0; gi < g1; ++gi) {
      float sum = 0.f;
      for (int64_t b = 0; b < L.B; ++b) sum += s[(gi - g0) * L.B + b];
      L.scores[gi] = sum / count;
    }
  }
}

bool row_walk(const Layer& L, Mode mode) { return mode == Mode::Penalty && L.A > 1 && L.B < kShortGroup; }

template <typename T>
void run_item(const Layer& L, const Item& item, Mode mode, bool mask) {
  const int64_t g0 = item.g0, g1 = item.g1;
  if (row_walk(L, mode)) return run_rows<T>(L, g0, g1, item.a0, item.a1, mask);
  T* __restrict w = static_cast<T*>(L.w);
  T* __restrict g = static_cast<T*>(L.g);
  T* __restrict buf = static_cast<T*>(L.buf);
  const float lr = L.lr, mu = L.momentum, wd = L.weight_decay;
  std::vector<float> acc(L.scores ? g1 - g0 : 0, 0.f);
  for (int64_t a = 0; a < L.A; ++a) {
    for (int64_t gi = g0; gi < g1; ++gi) {
      const int64_t base = a * L.sA + gi * L.B;
      const bool keep = kept_at(L, gi);
      const float lam = keep ? L.lam_kept : L.lam_selected;
      const bool zero = mask && !keep;
      float s = 0.f;
      if (mode == Mode::Scores) {
#pragma omp simd reduction(+ : s)
        for (int64_t b = 0; b < L.B; ++b) s += std::abs(static_cast<float>(w[base + b]));
      } else if (mode == Mode::Penalty) {
        if (zero) {
          for (int64_t b = 0; b < L.B; ++b) w[base + b] = T(0), g[base + b] = T(0);
        } else if (lam == 0.f) {  // nothing to add: leave the gradient untouched (GReg-1's kept groups)
          if (L.scores) {
#pragma omp simd reduction(+ : s)
            for (int64_t b = 0; b < L.B; ++b) s += std::abs(static_cast<float>(w[base + b]));
          }
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
        } else {
          auto update = [&](auto has_momentum) {  // one loop, compiled with and without a buffer
            constexpr bool kMomentum = decltype(has_momentum)::value;
#pragma omp simd reduction(+ : s)
            for (int64_t b = 0; b < L.B; ++b) {
              const float wv = static_cast<float>(w[base + b]);
              s += std::abs(wv);
              float d = static_cast<float>(g[base + b]) + wv * lam;
              d = d + wv * wd;
              if constexpr (kMomentum) {
                const T m = static_cast<T>(static_cast<float>(buf[base + b]) * mu + d);
                buf[base + b] = m;
                d = static_cast<float>(m);
              }
              w[base + b] = static_cast<T>(wv - lr * d);
            }
          };
          if (buf) {
            update(std::true_type{});
          } else {
            update(std::false_type{});
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

// A portable build (no -march=native, which makes a binary die on older CPUs) still runs AVX2/FMA
// loops where the CPU has them: GCC compiles this function once per target, run_item inlined into
// each (flatten), and picks the clone when the library loads.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define GREG_FAST_CLONES __attribute__((target_clones("arch=x86-64-v3", "default"), flatten))
#else
#define GREG_FAST_CLONES
#endif

GREG_FAST_CLONES void run_items(const std::vector<Layer>& layers, const Item* items, int64_t n, Mode mode,
                                bool mask) {
  for (int64_t k = 0; k < n; ++k) {
    const Layer& L = layers[items[k].layer];
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, L.dtype, "greg_fast_step",
                                    [&] { run_item<scalar_t>(L, items[k], mode, mask); });
  }
}

// passes: sizes of consecutive runs of layers that run one after the other (a parameter's rows and
// its columns share entries: never in one parallel loop); empty: all layers in one.
void run(std::vector<Layer>& layers, Mode mode, bool mask, at::IntArrayRef passes = {}) {
  const int64_t n = layers.size();
  std::vector<int64_t> ends(passes.begin(), passes.end());
  int64_t total = 0;
  for (auto& e : ends) {
    TORCH_CHECK(e >= 0, "passes must hold non-negative sizes");
    e = total += e;
  }
  TORCH_CHECK(ends.empty() || total == n, "passes cover ", total, " layers, not ", n);
  if (ends.empty()) ends.push_back(n);
  int64_t first = 0;
  for (int64_t end : ends) {
    std::vector<Item> items;
    for (int64_t i = first; i < end; ++i) {
      const Layer& L = layers[i];
      if (row_walk(L, mode) && !L.scores) {  // blocks of whole rows: long contiguous runs, no sums to share
        const int64_t per = std::max<int64_t>(1, kItemElements / std::max<int64_t>(1, L.G * L.B));
        for (int64_t a0 = 0; a0 < L.A; a0 += per) items.push_back({i, 0, L.G, a0, std::min(L.A, a0 + per)});
        continue;
      }
      const int64_t per = std::max<int64_t>(1, kItemElements / std::max<int64_t>(1, L.A * L.B));
      for (int64_t g0 = 0; g0 < L.G; g0 += per) items.push_back({i, g0, std::min(L.G, g0 + per), 0, L.A});
    }
    at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t begin, int64_t stop) {
      run_items(layers, items.data() + begin, stop - begin, mode, mask);
    });
    first = end;
  }
}

// w is A rows of contiguous elements, w.stride(0) apart: a run of columns of a contiguous parameter.
bool strided_rows(const at::Tensor& w, int64_t A) {
  if (w.dim() < 2 || w.size(0) != A || A < 2) return false;
  int64_t expected = 1;
  for (int64_t d = w.dim() - 1; d >= 1; --d) {
    if (w.size(d) != 1 && w.stride(d) != expected) return false;
    expected *= w.size(d);
  }
  return w.stride(0) >= expected;
}

// Can the kernel walk t (the weight, its gradient or a buffer) as the layer's [A, G, B] view? Row-
// major always can; so can rows of A that are each contiguous, sA apart (a run of a parameter's
// columns), and for filter groups (A == 1) channels_last, which keeps each filter one block of B
// elements (the work inside a filter is elementwise or a sum, blind to the order), when t has the
// weight's strides. The rule is greg_fast.backend.base.eligible, which sorts layers before the
// call: here it only guards the memory the loops touch.
bool walkable(const at::Tensor& t, const at::Tensor& w, int64_t A, int64_t B) {
  if (t.is_contiguous() && w.is_contiguous()) return true;
  if (t.strides() != w.strides()) return false;
  return strided_rows(w, A) ||
         (A == 1 && w.dim() == 4 && w.stride(0) == B && w.is_contiguous(at::MemoryFormat::ChannelsLast));
}

// A dtype or layout the loops cannot walk is a refusal (NotImplementedError in Python: the caller
// sends those layers through eager, see greg_fast.backend.base.eligible); any other failed check
// is a bug and stays a RuntimeError. Every check runs before anything is written.
void check_tensor(const at::Tensor& t, const char* what, int64_t i, const at::Tensor& like, const Layer& layer) {
  TORCH_CHECK(t.device().is_cpu(), what, "[", i, "] must be a CPU tensor, got ", t.device());
  const auto dtype = like.scalar_type();
  TORCH_CHECK_NOT_IMPLEMENTED(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16, what, "[", i,
                              "] has dtype ", dtype, ": the kernel takes fp32, fp16 and bf16");
  TORCH_CHECK_NOT_IMPLEMENTED(t.scalar_type() == dtype, what, "[", i, "] has dtype ", t.scalar_type(),
                              " but the weight has ", dtype);
  TORCH_CHECK(t.numel() == like.numel(), what, "[", i, "] has ", t.numel(), " elements, the weight ", like.numel());
  TORCH_CHECK_NOT_IMPLEMENTED(walkable(t, like, layer.A, layer.B), what, "[", i,
                              "] must be contiguous (or, for filter groups, channels_last like the weight)");
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
    const int64_t A = views[3 * i], G = views[3 * i + 1], B = views[3 * i + 2];
    TORCH_CHECK(A * G * B == w.numel(), "views[", i, "] = [", A, ", ", G, ", ", B, "] does not cover the ",
                w.numel(), " elements of weights[", i, "]");
    const int64_t sA = (A > 1 && !w.is_contiguous()) ? w.stride(0) : G * B;
    layers[i] = Layer{w.scalar_type(), w.data_ptr(), nullptr, nullptr, nullptr, nullptr, A, G, B, sA,
                      0.f, 0.f, 0.f, 0.f, 0.f, want_scores ? scores.data_ptr<float>() + offset : nullptr};
    check_tensor(w, "weights", i, w, layers[i]);
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
    check_tensor(grads[i], "grads", i, weights[i], layers[i]);
    const int64_t G = layers[i].G;
    const bool bits = kept[i].scalar_type() == at::kByte;
    TORCH_CHECK(kept[i].is_contiguous() && kept[i].device().is_cpu() &&
                    ((kept[i].scalar_type() == at::kBool && kept[i].numel() == G) ||
                     (bits && kept[i].numel() == (G + 7) / 8)),
                "kept[", i, "] must be a CPU bool tensor of ", G, " elements or uint8 bits of ", (G + 7) / 8);
    layers[i].g = grads[i].data_ptr();
    if (bits) {
      layers[i].kept_bits = kept[i].data_ptr<uint8_t>();
    } else {
      layers[i].kept = kept[i].data_ptr<bool>();
    }
    layers[i].lam_kept = lk[i];
    layers[i].lam_selected = ls[i];
  }
}

// a 0-d bool flag the caller may compute on the device schedule (no host read before the call)
bool read_flag(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.numel() == 1 && t.scalar_type() == at::kBool && t.device().is_cpu(), what,
              " must be a one-element CPU bool tensor");
  return *t.data_ptr<bool>();
}

void scores_(at::TensorList weights, at::IntArrayRef views, const at::Tensor& scores) {
  TORCH_CHECK(scores.numel() > 0 || weights.empty(), "scores_ needs an output tensor");
  auto layers = make_layers(weights, views, scores);
  run(layers, Mode::Scores, false);
}

void penalty_(at::TensorList weights, at::TensorList grads, at::TensorList kept, const at::Tensor& lam_kept,
              const at::Tensor& lam_selected, at::IntArrayRef views, const at::Tensor& mask,
              const at::Tensor& scores, at::IntArrayRef passes) {
  auto layers = make_layers(weights, views, scores);
  set_penalty(layers, grads, kept, lam_kept, lam_selected, weights);
  run(layers, Mode::Penalty, read_flag(mask, "mask"), passes);
}

void fused_sgd_(at::TensorList weights, at::TensorList grads, at::TensorList momentum_buffers,
                at::TensorList kept, const at::Tensor& lam_kept, const at::Tensor& lam_selected,
                const at::Tensor& hyper, at::IntArrayRef views, const at::Tensor& mask, const at::Tensor& skip,
                const at::Tensor& scores) {
  auto layers = make_layers(weights, views, scores);
  set_penalty(layers, grads, kept, lam_kept, lam_selected, weights);
  const int64_t n = layers.size();
  TORCH_CHECK(static_cast<int64_t>(momentum_buffers.size()) == n, "momentum_buffers must have one entry per layer");
  TORCH_CHECK(hyper.scalar_type() == at::kFloat && hyper.is_contiguous() && hyper.device().is_cpu() &&
                  hyper.dim() == 2 && hyper.size(0) == n && hyper.size(1) == 3,
              "hyper must be a contiguous fp32 CPU tensor [", n, ", 3]: lr, momentum, weight_decay per layer");
  const bool masked = read_flag(mask, "mask");
  if (read_flag(skip, "skip")) return;  // a skipped step (non-finite gradients): nothing is written
  const float* h = hyper.data_ptr<float>();
  for (int64_t i = 0; i < n; ++i) {
    if (momentum_buffers[i].numel() > 0) {  // an empty tensor: plain SGD for this layer
      check_tensor(momentum_buffers[i], "momentum_buffers", i, weights[i], layers[i]);
      layers[i].buf = momentum_buffers[i].data_ptr();
    }
    layers[i].lr = h[3 * i];
    layers[i].momentum = h[3 * i + 1];
    layers[i].weight_decay = h[3 * i + 2];
  }
  run(layers, Mode::FusedSGD, masked);
}

// ---- compaction: gather kept rows and columns of many tensors in one call ----
struct GatherJob {
  const char* src;
  char* dst;
  const int64_t* r;
  const int64_t* c;
  int64_t nr, nc, d1, inner, bytes;
};

template <typename E>
void copy_cols(E* __restrict dst, const E* __restrict src, const GatherJob& j) {
  const int64_t inner = j.inner;
  for (int64_t c = 0; c < j.nc; ++c) {
    const E* s = src + j.c[c] * inner;
    E* d = dst + c * inner;
    for (int64_t k = 0; k < inner; ++k) d[k] = s[k];
  }
}

// out[i][r, c, ...] = tensors[i][rows[i][r], cols[i][c], ...]; an empty index list keeps the axis.
std::vector<at::Tensor> gather(at::TensorList tensors, at::TensorList rows, at::TensorList cols) {
  const int64_t n = tensors.size();
  TORCH_CHECK(static_cast<int64_t>(rows.size()) == n && static_cast<int64_t>(cols.size()) == n,
              "tensors, rows and cols must have one entry per tensor");
  using Job = GatherJob;
  std::vector<at::Tensor> outs;
  std::vector<Job> jobs;
  std::vector<std::pair<int64_t, int64_t>> items;  // (job, output row)
  for (int64_t i = 0; i < n; ++i) {
    const at::Tensor& t = tensors[i];
    TORCH_CHECK(t.device().is_cpu() && t.is_contiguous(), "tensors[", i, "] must be a contiguous CPU tensor");
    TORCH_CHECK(t.dim() >= 1, "tensors[", i, "] must have at least one dimension");
    for (const auto* idx : {&rows[i], &cols[i]}) {
      TORCH_CHECK(idx->scalar_type() == at::kLong && idx->is_contiguous() && idx->device().is_cpu(),
                  "rows[", i, "] and cols[", i, "] must be contiguous int64 CPU tensors");
    }
    TORCH_CHECK(cols[i].numel() == 0 || t.dim() >= 2, "cols[", i, "] given for a 1-d tensor");
    const int64_t d0 = t.size(0), d1 = t.dim() >= 2 ? t.size(1) : 1;
    const int64_t inner = t.dim() >= 2 ? t.numel() / std::max<int64_t>(1, d0 * d1) : 1;
    const int64_t nr = rows[i].numel() ? rows[i].numel() : d0, nc = cols[i].numel() ? cols[i].numel() : d1;
    for (int64_t k = 0; k < rows[i].numel(); ++k) {
      const int64_t r = rows[i].data_ptr<int64_t>()[k];
      TORCH_CHECK(r >= 0 && r < d0, "rows[", i, "] holds ", r, ", outside [0, ", d0, ")");
    }
    for (int64_t k = 0; k < cols[i].numel(); ++k) {
      const int64_t c = cols[i].data_ptr<int64_t>()[k];
      TORCH_CHECK(c >= 0 && c < d1, "cols[", i, "] holds ", c, ", outside [0, ", d1, ")");
    }
    std::vector<int64_t> shape(t.sizes().begin(), t.sizes().end());
    shape[0] = nr;
    if (t.dim() >= 2) shape[1] = nc;
    outs.push_back(at::empty(shape, t.options()));
    jobs.push_back({static_cast<const char*>(t.data_ptr()), static_cast<char*>(outs.back().data_ptr()),
                    rows[i].numel() ? rows[i].data_ptr<int64_t>() : nullptr,
                    cols[i].numel() ? cols[i].data_ptr<int64_t>() : nullptr, nr, nc, d1, inner,
                    static_cast<int64_t>(t.element_size())});
    for (int64_t r = 0; r < nr; ++r) items.emplace_back(i, r);
  }
  at::parallel_for(0, static_cast<int64_t>(items.size()), 16, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      const Job& j = jobs[items[k].first];
      const int64_t r = items[k].second, src_row = j.r ? j.r[r] : r;
      const int64_t row_bytes = j.nc * j.inner * j.bytes;
      char* dst = j.dst + r * row_bytes;
      const char* src = j.src + src_row * j.d1 * j.inner * j.bytes;
      if (!j.c) {
        std::memcpy(dst, src, row_bytes);
        continue;
      }
      // typed element copies: a memcpy call per 1x1 or 3x3 block costs more than the copy itself
      switch (j.bytes) {
        case 2: copy_cols(reinterpret_cast<uint16_t*>(dst), reinterpret_cast<const uint16_t*>(src), j); break;
        case 4: copy_cols(reinterpret_cast<uint32_t*>(dst), reinterpret_cast<const uint32_t*>(src), j); break;
        case 8: copy_cols(reinterpret_cast<uint64_t*>(dst), reinterpret_cast<const uint64_t*>(src), j); break;
        default:
          for (int64_t c = 0; c < j.nc; ++c)
            std::memcpy(dst + c * j.inner * j.bytes, src + j.c[c] * j.inner * j.bytes, j.inner * j.bytes);
      }
    }
  });
  return outs;
}

// ---- unstructured export ----
// Bitmap: bit k of byte b is element 8b+k (little-endian, numpy's bitorder="little"); values are the
// kept elements in order.
std::tuple<at::Tensor, at::Tensor> pack_bitmap(const at::Tensor& weight, const at::Tensor& mask) {
  TORCH_CHECK(weight.device().is_cpu() && weight.is_contiguous(), "weight must be a contiguous CPU tensor");
  TORCH_CHECK(mask.scalar_type() == at::kBool && mask.is_contiguous() && mask.numel() == weight.numel(),
              "mask must be a contiguous bool tensor with one entry per weight");
  const int64_t n = weight.numel(), nbytes = (n + 7) / 8;
  const bool* m = mask.data_ptr<bool>();
  constexpr int64_t kChunk = 1 << 15;  // a multiple of 8: chunks own whole bytes
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  std::vector<int64_t> start(chunks + 1, 0);
  at::parallel_for(0, chunks, 1, [&](int64_t b, int64_t e) {
    for (int64_t k = b; k < e; ++k) {
      int64_t count = 0;
      for (int64_t i = k * kChunk; i < std::min(n, (k + 1) * kChunk); ++i) count += m[i];
      start[k + 1] = count;
    }
  });
  for (int64_t k = 0; k < chunks; ++k) start[k + 1] += start[k];
  at::Tensor bits = at::zeros({nbytes}, at::kByte);
  at::Tensor values = at::empty({start[chunks]}, weight.options());
  uint8_t* out_bits = bits.data_ptr<uint8_t>();
  const char* src = static_cast<const char*>(weight.data_ptr());
  char* dst = static_cast<char*>(values.data_ptr());
  const int64_t es = weight.element_size();
  at::parallel_for(0, chunks, 1, [&](int64_t b, int64_t e) {
    for (int64_t k = b; k < e; ++k) {
      int64_t pos = start[k];
      for (int64_t i = k * kChunk; i < std::min(n, (k + 1) * kChunk); ++i) {
        if (m[i]) {
          out_bits[i >> 3] |= static_cast<uint8_t>(1u << (i & 7));
          std::memcpy(dst + pos * es, src + i * es, es);
          ++pos;
        }
      }
    }
  });
  return {bits, values};
}

// CSR of a weight viewed as [rows, cols]: crow_indices [rows + 1], col_indices and values of kept entries.
std::tuple<at::Tensor, at::Tensor, at::Tensor> pack_csr(const at::Tensor& weight, const at::Tensor& mask) {
  TORCH_CHECK(weight.dim() == 2 && weight.device().is_cpu() && weight.is_contiguous(),
              "weight must be a contiguous 2-d CPU tensor");
  TORCH_CHECK(mask.scalar_type() == at::kBool && mask.is_contiguous() && mask.sizes() == weight.sizes(),
              "mask must be a contiguous bool tensor shaped like the weight");
  const int64_t rows = weight.size(0), cols = weight.size(1), es = weight.element_size();
  const bool* m = mask.data_ptr<bool>();
  at::Tensor crow = at::zeros({rows + 1}, at::kLong);
  int64_t* cr = crow.data_ptr<int64_t>();
  at::parallel_for(0, rows, 64, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      int64_t count = 0;
      for (int64_t c = 0; c < cols; ++c) count += m[r * cols + c];
      cr[r + 1] = count;
    }
  });
  for (int64_t r = 0; r < rows; ++r) cr[r + 1] += cr[r];
  at::Tensor col = at::empty({cr[rows]}, at::kLong);
  at::Tensor values = at::empty({cr[rows]}, weight.options());
  int64_t* ci = col.data_ptr<int64_t>();
  const char* src = static_cast<const char*>(weight.data_ptr());
  char* dst = static_cast<char*>(values.data_ptr());
  at::parallel_for(0, rows, 64, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      int64_t pos = cr[r];
      for (int64_t c = 0; c < cols; ++c) {
        if (m[r * cols + c]) {
          ci[pos] = c;
          std::memcpy(dst + pos * es, src + (r * cols + c) * es, es);
          ++pos;
        }
      }
    }
  });
  return {crow, col, values};
}

}  // namespace

TORCH_LIBRARY(greg_fast, m) {
  m.def("gather(Tensor[] tensors, Tensor[] rows, Tensor[] cols) -> Tensor[]");
  m.def("pack_bitmap(Tensor weight, Tensor mask) -> (Tensor, Tensor)");
  m.def("pack_csr(Tensor weight, Tensor mask) -> (Tensor, Tensor, Tensor)");
  m.def("scores_(Tensor[] weights, int[] views, Tensor(a!) scores) -> ()");
  m.def("penalty_(Tensor(a!)[] weights, Tensor(b!)[] grads, Tensor[] kept, Tensor lam_kept, "
        "Tensor lam_selected, int[] views, Tensor mask, Tensor(c!) scores, int[] passes=[]) -> ()");
  m.def("fused_sgd_(Tensor(a!)[] weights, Tensor[] grads, Tensor(b!)[] momentum_buffers, Tensor[] kept, "
        "Tensor lam_kept, Tensor lam_selected, Tensor hyper, int[] views, Tensor mask, Tensor skip, "
        "Tensor(c!) scores) -> ()");
}

TORCH_LIBRARY_IMPL(greg_fast, CPU, m) {
  m.impl("scores_", &scores_);
  m.impl("penalty_", &penalty_);
  m.impl("fused_sgd_", &fused_sgd_);
  m.impl("gather", &gather);
  m.impl("pack_bitmap", &pack_bitmap);
  m.impl("pack_csr", &pack_csr);
}

}  // namespace greg_fast

// Importing greg_fast._C registers the ops above (torch.ops.greg_fast.*), and adds one host
// helper that is not an op (a dispatched call costs more than the work it would save).
#include <Python.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>

namespace {

void put_tensor(std::vector<int64_t>& out, const at::Tensor& t) {
  if (!t.defined()) {
    out.push_back(-1);
    return;
  }
  out.push_back(reinterpret_cast<int64_t>(t.data_ptr()));
  out.push_back(static_cast<int64_t>(t.scalar_type()));
  out.push_back(t.dim());
  for (int64_t stride : t.strides()) out.push_back(stride);
}

void put_object(std::vector<int64_t>& out, PyObject* obj) {
  if (obj == Py_None) {
    out.push_back(-1);
  } else if (THPVariable_Check(obj)) {
    put_tensor(out, THPVariable_Unpack(obj));
  } else {
    throw torch::TypeError(std::string("launch_state takes tensors or None, got ") + Py_TYPE(obj)->tp_name);
  }
}

// launch_state(dicts, names, tensors) -> bytes: the address, dtype and strides of each
// dicts[i][names[i]] (a module's parameter) and of its .grad, then of each of `tensors` (None
// allowed). Raw values, not a hash: equal bytes mean an equal state. A Triton launch bakes these
// addresses into its tables; this reads them for a whole model in one call, every step.
PyObject* launch_state(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 3 || !PyList_Check(args[0]) || !PyList_Check(args[1]) || !PyList_Check(args[2]) ||
      PyList_GET_SIZE(args[0]) != PyList_GET_SIZE(args[1])) {
    throw torch::TypeError("launch_state(dicts, names, tensors): three lists, dicts and names of one length");
  }
  std::vector<int64_t> out;
  out.reserve(8 * (2 * PyList_GET_SIZE(args[0]) + PyList_GET_SIZE(args[2])));
  for (Py_ssize_t i = 0; i < PyList_GET_SIZE(args[0]); ++i) {
    PyObject* param = PyDict_GetItemWithError(PyList_GET_ITEM(args[0], i), PyList_GET_ITEM(args[1], i));
    if (param == nullptr) {
      if (PyErr_Occurred()) return nullptr;
      out.push_back(-2);  // no such parameter (any more): the state differs from any launch's
      continue;
    }
    put_object(out, param);
    if (param != Py_None) put_tensor(out, THPVariable_Unpack(param).grad());
  }
  for (Py_ssize_t i = 0; i < PyList_GET_SIZE(args[2]); ++i) put_object(out, PyList_GET_ITEM(args[2], i));
  return PyBytes_FromStringAndSize(reinterpret_cast<const char*>(out.data()),
                                   static_cast<Py_ssize_t>(out.size() * sizeof(int64_t)));
  END_HANDLE_TH_ERRORS
}

PyMethodDef methods[] = {
    {"launch_state", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(launch_state)), METH_FASTCALL,
     "launch_state(dicts, names, tensors) -> bytes: addresses, dtypes and strides of parameters, their grads "
     "and tensors"},
    {nullptr, nullptr, 0, nullptr}};

struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module); }
