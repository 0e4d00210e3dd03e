// CPU kernels of Strato's quantized-linear ops (schemas in kernels/quantized_linear.py), so
// that compiled graphs (inductor, AOTInductor) call the GEMV kernels of cpu_gemv.c through
// the dispatcher without entering Python:
// - strato::cpu_gemv_int8/int4 (blocked codes, what lowered graphs call): always here;
// - strato::quant_linear_int8/int4 (portable codes, what AOTInductor step packages call):
//   here when the input has 1-8 rows (decoding) and no switch asks for other kernels;
//   every other call goes to the Python impl (the op strato::_quant_linear_*_python),
//   which picks among Triton, aten's packed kernels and dequantize + BLAS.
// Same checks, kernels and results as the Python impls, which stay the fallback where
// this library does not build. Built and loaded by quantized_linear.load_native_gemv_ops().

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/constant_pad_nd.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>
#include <optional>

extern "C" {
void strato_int8_gemv(const float *x, int64_t M, int64_t K, const int8_t *q, int64_t N,
                      const float *s, const float *z, float *y, int blocked, int threads);
void strato_int8_gemv_q8(const float *x, int64_t M, int64_t K, const int8_t *q, int64_t N,
                         const float *s, const float *z, float *y, int blocked, int threads);
void strato_int4_gemv(const float *x, int64_t M, int64_t Kp, const uint8_t *q, int64_t N,
                      const float *s, const float *z, int64_t g, float *y, int blocked,
                      int threads);
void strato_int4_gemv_q8(const float *x, int64_t M, int64_t Kp, const uint8_t *q, int64_t N,
                         const float *s, const float *z, int64_t g, float *y, int blocked,
                         int threads);
}

namespace {

constexpr int64_t kBlockRows = 4;  // ROWS in cpu_gemv.c

// Whether STRATO_CPU_GEMV_ACTIVATIONS asks for the int16 fixed-point kernels (the default)
// rather than int8 blocks, as cpu_gemv.activation_format() reads it.
bool int16_activations() {
  const char *value = std::getenv("STRATO_CPU_GEMV_ACTIVATIONS");
  if (value == nullptr || !*value || !std::strcmp(value, "int16")) return true;
  TORCH_CHECK_VALUE(!std::strcmp(value, "int8"), "STRATO_CPU_GEMV_ACTIVATIONS='", value,
                    "' is not an activation format; set it to int16 (16-bit fixed point per "
                    "row, the default) or int8 (blocks of 32)");
  return false;
}

at::Tensor as_fp32(const at::Tensor &t) {
  return t.scalar_type() == at::kFloat && t.is_contiguous() ? t : t.to(at::kFloat).contiguous();
}

// The codes' bytes per row of their blocked layout [ceil(N / 4), chunks, 4, 16].
int64_t blocked_width(const at::Tensor &codes, at::ScalarType dtype, int64_t n,
                      const char *op) {
  TORCH_CHECK_VALUE(codes.scalar_type() == dtype && codes.is_contiguous(), op,
                    ": expected contiguous ", dtype, " codes, got ", codes.scalar_type(), " ",
                    codes.sizes());
  const int64_t blocks = (n + kBlockRows - 1) / kBlockRows;
  TORCH_CHECK_VALUE(codes.dim() == 4 && codes.size(0) == blocks &&
                        codes.size(2) == kBlockRows && codes.size(3) == 16,
                    op, ": blocked codes for ", n, " rows must be [", blocks, ", chunks, ",
                    kBlockRows, ", 16] (cpu_gemv.block_codes builds them), got ",
                    codes.sizes());
  return codes.size(1) * 16;
}

// The kernels' fp32 output [rows, N] as x's leading dims, in x's dtype, plus the bias.
at::Tensor finish(at::Tensor y, const at::Tensor &x, const std::optional<at::Tensor> &bias) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end() - 1);
  shape.push_back(y.size(1));
  y = y.view(shape);
  if (x.scalar_type() != at::kFloat) y = y.to(x.scalar_type());
  if (bias.has_value()) y = y.add(bias->to(y.scalar_type()));
  return y;
}

at::Tensor cpu_gemv_int8(const at::Tensor &x, const at::Tensor &codes, const at::Tensor &scales,
                         const std::optional<at::Tensor> &zeros,
                         const std::optional<at::Tensor> &bias) {
  const int64_t n = scales.size(0), k = x.size(-1);
  const int64_t width = blocked_width(codes, at::kChar, n, "strato::cpu_gemv_int8");
  TORCH_CHECK_VALUE(width == (k + 15) / 16 * 16 && scales.dim() == 1 &&
                        (!zeros.has_value() || zeros->sizes() == scales.sizes()),
                    "strato::cpu_gemv_int8: input [..., ", k, "] does not fit codes ",
                    codes.sizes(), " with scales ", scales.sizes());
  const at::Tensor xf = as_fp32(x), s = as_fp32(scales);
  const std::optional<at::Tensor> z = zeros.has_value() ? std::optional(as_fp32(*zeros))
                                                        : std::nullopt;
  const int64_t rows = k ? xf.numel() / k : 0;
  at::Tensor y = at::empty({rows, n}, xf.options());
  auto kernel = int16_activations() ? strato_int8_gemv : strato_int8_gemv_q8;
  kernel(xf.data_ptr<float>(), rows, k, codes.data_ptr<int8_t>(), n, s.data_ptr<float>(),
         z ? z->data_ptr<float>() : nullptr, y.data_ptr<float>(), 1, at::get_num_threads());
  return finish(y, x, bias);
}

at::Tensor cpu_gemv_int4(const at::Tensor &x, const at::Tensor &codes, const at::Tensor &scales,
                         const std::optional<at::Tensor> &zeros,
                         const std::optional<at::Tensor> &bias, int64_t group_size) {
  const int64_t n = scales.size(0);
  const int64_t kp = blocked_width(codes, at::kByte, n, "strato::cpu_gemv_int4") * 2;
  const bool fits = x.size(-1) <= kp && group_size > 0 && group_size % 32 == 0 &&
                    kp % group_size == 0 && scales.dim() == 2 &&
                    scales.size(1) == kp / group_size &&
                    (!zeros.has_value() || zeros->sizes() == scales.sizes());
  TORCH_CHECK_VALUE(fits, "strato::cpu_gemv_int4: input [..., ", x.size(-1),
                    "] does not fit codes ", codes.sizes(), " in groups of ", group_size,
                    " with scales ", scales.sizes());
  at::Tensor xf = as_fp32(x);
  if (xf.size(-1) != kp) xf = at::constant_pad_nd(xf, {0, kp - xf.size(-1)});
  const at::Tensor s = as_fp32(scales);
  const std::optional<at::Tensor> z = zeros.has_value() ? std::optional(as_fp32(*zeros))
                                                        : std::nullopt;
  const int64_t rows = xf.numel() / kp;
  at::Tensor y = at::empty({rows, n}, xf.options());
  auto kernel = int16_activations() ? strato_int4_gemv : strato_int4_gemv_q8;
  kernel(xf.data_ptr<float>(), rows, kp, codes.data_ptr<uint8_t>(), n, s.data_ptr<float>(),
         z ? z->data_ptr<float>() : nullptr, group_size, y.data_ptr<float>(), 1,
         at::get_num_threads());
  return finish(y, x, bias);
}

constexpr int64_t kMaxRows = 8;  // cpu_gemv.MAX_ROWS

// quantized_linear.reference_kernels() sets this for its thread (through
// strato_gemv_reference_kernels), so that tests compare against the references.
thread_local bool reference_kernels = false;

// Whether a portable op call is the decode GEMV this file serves (else Python's impl picks).
bool serves(const at::Tensor &x, const at::Tensor &qweight, at::ScalarType code_dtype) {
  if (reference_kernels || x.device().type() != at::kCPU || qweight.scalar_type() != code_dtype ||
      !qweight.is_contiguous() || qweight.dim() != 2 || x.dim() == 0)
    return false;
  const char *kernels = std::getenv("STRATO_KERNELS");
  if (kernels != nullptr && *kernels) return false;
  const int64_t k = x.size(-1), rows = k ? x.numel() / k : 0;
  return rows > 0 && rows <= kMaxRows;
}

template <typename... Args>
at::Tensor python_impl(const char *name, Args &&...args) {
  using Signature = at::Tensor(std::decay_t<Args>...);
  auto op = c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
  return op.call(std::forward<Args>(args)...);
}

at::Tensor quant_linear_int8(const at::Tensor &x, const at::Tensor &qweight,
                             const at::Tensor &scales, const std::optional<at::Tensor> &zeros,
                             const std::optional<at::Tensor> &bias) {
  const int64_t n = qweight.size(0), k = x.size(-1);
  if (!serves(x, qweight, at::kChar) || qweight.size(1) != k || scales.dim() != 1 ||
      scales.size(0) != n || (zeros.has_value() && zeros->sizes() != scales.sizes()))
    return python_impl("strato::_quant_linear_int8_python", x, qweight, scales, zeros, bias);
  const at::Tensor xf = as_fp32(x), s = as_fp32(scales);
  const std::optional<at::Tensor> z = zeros.has_value() ? std::optional(as_fp32(*zeros))
                                                        : std::nullopt;
  const int64_t rows = xf.numel() / k;
  at::Tensor y = at::empty({rows, n}, xf.options());
  auto kernel = int16_activations() ? strato_int8_gemv : strato_int8_gemv_q8;
  kernel(xf.data_ptr<float>(), rows, k, qweight.data_ptr<int8_t>(), n, s.data_ptr<float>(),
         z ? z->data_ptr<float>() : nullptr, y.data_ptr<float>(), 0, at::get_num_threads());
  return finish(y, x, bias);
}

at::Tensor quant_linear_int4(const at::Tensor &x, const at::Tensor &qweight,
                             const at::Tensor &scales, const std::optional<at::Tensor> &zeros,
                             const std::optional<at::Tensor> &bias, int64_t group_size,
                             int64_t in_features) {
  const int64_t n = qweight.size(0), kp = qweight.size(1) * 2;
  const bool fits = group_size > 0 && group_size % 32 == 0 && kp % group_size == 0 &&
                    x.size(-1) == in_features && in_features <= kp && scales.dim() == 2 &&
                    scales.size(0) == n && scales.size(1) == kp / group_size &&
                    (!zeros.has_value() || zeros->sizes() == scales.sizes());
  if (!serves(x, qweight, at::kByte) || !fits)
    return python_impl("strato::_quant_linear_int4_python", x, qweight, scales, zeros, bias,
                       group_size, in_features);
  at::Tensor xf = as_fp32(x);
  if (xf.size(-1) != kp) xf = at::constant_pad_nd(xf, {0, kp - xf.size(-1)});
  const at::Tensor s = as_fp32(scales);
  const std::optional<at::Tensor> z = zeros.has_value() ? std::optional(as_fp32(*zeros))
                                                        : std::nullopt;
  const int64_t rows = xf.numel() / kp;
  at::Tensor y = at::empty({rows, n}, xf.options());
  auto kernel = int16_activations() ? strato_int4_gemv : strato_int4_gemv_q8;
  kernel(xf.data_ptr<float>(), rows, kp, qweight.data_ptr<uint8_t>(), n, s.data_ptr<float>(),
         z ? z->data_ptr<float>() : nullptr, group_size, y.data_ptr<float>(), 0,
         at::get_num_threads());
  return finish(y, x, bias);
}

}  // namespace

extern "C" int strato_gemv_reference_kernels(int on) {
  const bool previous = reference_kernels;
  reference_kernels = on != 0;
  return previous;
}

TORCH_LIBRARY_IMPL(strato, CPU, m) {
  m.impl("cpu_gemv_int8", &cpu_gemv_int8);
  m.impl("cpu_gemv_int4", &cpu_gemv_int4);
  m.impl("quant_linear_int8", &quant_linear_int8);
  m.impl("quant_linear_int4", &quant_linear_int4);
}
