// Input-check macros shared by the kernels' entry points.
//
// Each failure says what was expected and what came. Shape and device problems raise ValueError in
// Python (c10::ValueError), dtype problems TypeError (c10::TypeError), matching mcl_kernels/_checks.py;
// both derive from c10::Error in C++.
#pragma once

#include <c10/util/Exception.h>

// `cond` must hold for the tensor(s) named in the message; the trailing arguments are streamed into it.
#define MCL_CHECK_SHAPE(cond, ...) TORCH_CHECK_VALUE(cond, __VA_ARGS__)

// `t` (called `name`) must live on the same device as the input `x`.
#define MCL_CHECK_DEVICE(t, x, name)                                                               \
  TORCH_CHECK_VALUE((t).device() == (x).device(), name, " is on ", (t).device(),                    \
                    " but the input x is on ", (x).device(),                                        \
                    "; move them to the same device (e.g. module.to(x.device))")

// `t` (called `name`) must have the dtype of the input `x`.
#define MCL_CHECK_DTYPE(t, x, name)                                                                \
  TORCH_CHECK_TYPE((t).scalar_type() == (x).scalar_type(), name, " has dtype ", (t).scalar_type(), \
                   " but the input x has dtype ", (x).scalar_type(),                                \
                   "; cast one to the other (e.g. module.to(x.dtype))")

// An optional parameter, when given, must match `x` in device and dtype.
#define MCL_CHECK_LIKE_INPUT(opt, x, name) \
  do {                                     \
    if ((opt).has_value()) {               \
      MCL_CHECK_DEVICE(*(opt), x, name);   \
      MCL_CHECK_DTYPE(*(opt), x, name);    \
    }                                      \
  } while (0)
