// Shared math of dmfast::cam_boxes: the upsampling (interpolate, bilinear, align_corners=False, in double) and the
// component record both kernels fill.
#pragma once

#include <cstdint>

#include "common.h"
#include "interpolate.h"

namespace dmfast {

using UpsampleTap = LinearTap<double>;

// Bilinear value as ATen computes it: rows first, then columns.
DMFAST_HD double bilinear(const double* map, int64_t w, const UpsampleTap& ty, const UpsampleTap& tx) {
  return ty.lambda0 * (tx.lambda0 * map[ty.i0 * w + tx.i0] + tx.lambda1 * map[ty.i0 * w + tx.i1]) +
         ty.lambda1 * (tx.lambda0 * map[ty.i1 * w + tx.i0] + tx.lambda1 * map[ty.i1 * w + tx.i1]);
}

// A connected component: its box (inclusive-exclusive), activation statistics, the threshold level that produced
// it and the raster index of its first pixel (the order scipy.ndimage.label numbers components in).
struct Component {
  int64_t x0, y0, x1, y1;
  double sum, max;
  int64_t count, level, first;
};

// Boxes are ranked by score (highest first), then by level, then in raster order of their first pixel.
DMFAST_HD bool ranks_before(double score_a, const Component& a, double score_b, const Component& b) {
  if (score_a != score_b) return score_a > score_b;
  if (a.level != b.level) return a.level < b.level;
  return a.first < b.first;
}

DMFAST_HD double component_score(const Component& c, bool mean) { return mean ? c.sum / double(c.count) : c.max; }

}  // namespace dmfast
