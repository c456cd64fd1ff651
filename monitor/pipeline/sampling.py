"""Sampling: cut the crops the classifier sees out of a decoded frame.

`whole`: the file is already one particle crop (as in the public dataset); its mask
is the crop's main object (Otsu threshold, largest blob).
`particles`: segment the frame (background correction, threshold, connected
components, a watershed split of blobs that look merged, size and per-object focus
filters, each particle's edge placed on a finer grid) and crop each particle with a
margin. With `separation = "learned"` a trained detector (particle_detector.py) finds
each particle's box instead, for slurries too crowded to cut by threshold.
`tiles`: fixed tiles on a grid, for slurries too dense to segment.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import cv2
import numpy as np

from monitor.config.settings import ParticlesConfig, ProbeConfig, TilesConfig
from monitor.inference.particle_detector import ParticleDetector, network_input
from monitor.manifest import default_detector_dir

_WORK_SCALE = 4  # background and mask are computed on a 4x smaller copy: ~16x less work
# Watershed, at the working scale. Seeds: distance-transform maxima at least
# _PEAK_MIN px deep (20 frame px: an agglomerate or a thick bundle, never a lone
# needle) and the deepest within _PEAK_RADIUS px (48 frame px). Two parts stay apart
# only across a neck shallower than _NECK_SHARE of the shallower part's depth, and a
# part smaller than _MIN_PART_AREA px (2,400 frame px²) joins its neighbour. Before
# the split a blob grows into the pixels above _LOW_SHARE of the threshold around it
# where that joins it to no other blob (only without refine_edges, which does the same
# on a finer grid after the split). Tuned on simulated sparse, medium and dense
# slurries (bench/instances.py) and two discs of radius 35 px overlapping by 7 px.
_PEAK_MIN = 5.0
_PEAK_RADIUS = 12
_NECK_SHARE = 0.8
_MIN_PART_AREA = 150
_LOW_SHARE = 0.5
# Edges on a finer grid (refine_edges, _EDGE_SCALE: 2 x 2 frame px, where a needle 1-3
# px wide keeps most of its light): a particle's pixels are those brighter than the
# background by _EDGE_SHARE of the threshold (half-way up a dim particle's blurred edge,
# where the simulator's truth places it too) and connected to it. Where faint pixels
# join two particles, each keeps those within its own working-scale segment.
_EDGE_SHARE = 0.5
_EDGE_SCALE = 2
_SHARED = 2**16 - 1  # a faint part that several particles' segments meet
# The learned detector's masks (separation = "learned"): within its box a particle owns
# the foreground inside _CORE (squared, in half sides) of its centre and, further out,
# the pixels no other box's centre is nearer to; its own pixels are closed with a
# _DETECTED_CLOSE px ellipse (on the 2 x 2 px grid, before ownership) so an
# agglomerate's grains make one silhouette. Chosen on bench/instances.py's D50 errors
# (2026-12-08): a smaller core cuts overlapping particles short (the truth counts a
# hidden part to both), a larger one adds crossing needles to a bundle.
_CORE = 0.75
_DETECTED_CLOSE = 9

Box = tuple[int, int, int, int]


@dataclass(frozen=True)
class Crop:
    image: np.ndarray  # 2-D uint8
    bbox: tuple[int, int, int, int]  # x, y, w, h in frame pixels
    mask: np.ndarray | None = None
    """The particle's own pixels within `bbox` (h x w, non-zero = particle, at frame
    resolution), from which its size is measured; None where the sampler has no object
    (tiles)."""


class Sampler(Protocol):
    def sample(self, grey: np.ndarray) -> list[Crop]: ...


class WholeImageSampler:
    """The file is one crop; its mask is the main object in it."""

    def sample(self, grey: np.ndarray) -> list[Crop]:
        return [Crop(grey, (0, 0, grey.shape[1], grey.shape[0]), main_object_mask(grey))]


def main_object_mask(grey: np.ndarray) -> np.ndarray:
    """The largest bright object of a single-particle crop (h x w uint8, 1 = object):
    Otsu's threshold on the lightly smoothed crop, closed, the largest blob with its
    holes filled. All zeros for a flat crop."""
    if grey.dtype != np.uint8:
        grey = cv2.normalize(grey, None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)
    smooth = cv2.GaussianBlur(grey, (0, 0), 1.5)
    if int(smooth.max()) - int(smooth.min()) < 8:
        return np.zeros(grey.shape, np.uint8)
    _, binary = cv2.threshold(smooth, 0, 1, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    binary = cv2.morphologyEx(
        binary, cv2.MORPH_CLOSE, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (7, 7))
    )
    contours, _ = cv2.findContours(binary, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    mask = np.zeros(grey.shape, np.uint8)
    if contours:
        largest = max(contours, key=cv2.contourArea)
        cv2.drawContours(mask, [largest], -1, 1, thickness=cv2.FILLED)
    return mask


class TileSampler:
    def __init__(self, config: TilesConfig) -> None:
        self._size = config.size
        self._stride = config.stride

    def sample(self, grey: np.ndarray) -> list[Crop]:
        height, width = grey.shape
        size = min(self._size, height, width)
        crops = []
        for y in range(0, height - size + 1, self._stride):
            for x in range(0, width - size + 1, self._stride):
                crops.append(Crop(grey[y : y + size, x : x + size], (x, y, size, size)))
        return crops


class ParticleSampler:
    """Finds bright particles on a dark, unevenly lit background.

    The foreground (background-corrected threshold, closed) is cut into connected
    blobs. With `separation = "watershed"` a blob whose distance transform has two or
    more well-separated maxima (two agglomerates touching, a bundle lying across
    another) is split by a marker watershed: one marker per maximum, flooded over the
    frame's grey levels within the blob, so the cut follows the edges between the
    particles. A blob with one maximum (most blobs of a sparse frame) keeps the cheap
    path. All this runs on a 4x smaller copy of the frame; then (refine_edges) each
    particle's edge is placed on a 2x smaller one, where thin needles still show.
    """

    def __init__(self, config: ParticlesConfig) -> None:
        self._config = config
        self._close = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5))
        # The simulator's truth closes a particle's pixels with this at frame resolution.
        edge_side = 5 // _EDGE_SCALE | 1
        self._edge_close = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (edge_side, edge_side))
        # 4-neighbours only: blobs are 4-connected, so a diagonal neighbour may be another's.
        self._cross = cv2.getStructuringElement(cv2.MORPH_CROSS, (3, 3))
        # A square window: separable, so the dilation costs little whatever its size.
        self._peak_window = cv2.getStructuringElement(
            cv2.MORPH_RECT, (2 * _PEAK_RADIUS + 1, 2 * _PEAK_RADIUS + 1)
        )
        self._detected_close = cv2.getStructuringElement(
            cv2.MORPH_ELLIPSE, (_DETECTED_CLOSE, _DETECTED_CLOSE)
        )
        self._detector = (
            ParticleDetector(config.detector or default_detector_dir(), config.detector_threshold)
            if config.separation in ("learned", "auto")
            else None
        )

    def find_particles(self, grey: np.ndarray) -> list[Box]:
        """Boxes (x, y, w, h) of in-focus particles, largest first."""
        return [box for box, _ in self.find_particle_masks(grey)]

    def find_particle_masks(self, grey: np.ndarray) -> list[tuple[Box, np.ndarray]]:
        """(box, mask) of each in-focus particle, largest first: the box in frame pixels
        and the particle's own segment within it (h x w uint8, 1 = particle, holes
        filled), its edge on the 2 x 2 px grid of refine_edges or, without, each
        working-scale pixel a 4 x 4 square."""
        config = self._config
        if self._detector is not None and config.separation == "learned":
            return self._detected(grey, self._detector)
        height, width = grey.shape
        work_size = (width // _WORK_SCALE, height // _WORK_SCALE)
        fine = None
        if config.refine_edges:
            # The finer copy first and the working one from it: the cheaper way to both.
            step = _WORK_SCALE // _EDGE_SCALE
            fine_size = (work_size[0] * step, work_size[1] * step)
            cut = grey[: work_size[1] * _WORK_SCALE, : work_size[0] * _WORK_SCALE]
            fine = cv2.resize(cut, fine_size, interpolation=cv2.INTER_AREA)
            small = cv2.resize(fine, work_size, interpolation=cv2.INTER_AREA)
        else:
            small = cv2.resize(grey, work_size, interpolation=cv2.INTER_AREA)
        # Illumination and out-of-focus haze vary slowly: a median over ~240 px follows
        # them but not the particles, which are smaller.
        tiny = cv2.resize(small, (width // 16, height // 16), interpolation=cv2.INTER_AREA)
        flat = cv2.medianBlur(tiny, 9)
        background = cv2.resize(flat, work_size, interpolation=cv2.INTER_LINEAR)
        corrected = cv2.subtract(small, background)
        raw_mask = (corrected > config.threshold).astype(np.uint8)
        crowded = float(raw_mask.mean()) > config.separation_max_cover
        if crowded and self._detector is not None:  # separation = "auto"
            return self._detected(grey, self._detector)
        # Closing joins the needles of a bundle and the grains of an agglomerate.
        mask = cv2.morphologyEx(raw_mask, cv2.MORPH_CLOSE, self._close)
        # A dense slurry (most of the frame foreground) is left unsplit: see
        # particles.separation_max_cover.
        split = config.separation in ("watershed", "auto") and not crowded
        if split and not config.refine_edges:
            mask = self._grow_alone(corrected, mask, config.threshold)
        if split or config.refine_edges:
            # Silhouettes, holes filled: an agglomerate's dark grains would give its
            # distance transform a maximum between every two of them, and they are its.
            mask = _fill_holes(mask)
        # The watershed floods between 4-neighbours: with it, blobs are 4-connected too,
        # or a corner-joined piece could be flooded from another blob through the gap.
        connectivity = 4 if split else 8
        count, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=connectivity)
        if split and count > 1:
            count, labels, stats = self._separate(corrected, mask, count, labels, stats)
        scale2 = _WORK_SCALE * _WORK_SCALE
        found = []
        for index in range(1, count):
            x, y, w, h, area = (int(v) for v in stats[index])
            if not config.min_area <= area * scale2 <= config.max_area:
                continue
            box = (x * _WORK_SCALE, y * _WORK_SCALE, w * _WORK_SCALE, h * _WORK_SCALE)
            if config.min_focus > 0 and _object_focus(grey, box) < config.min_focus:
                continue
            found.append((area, box, index))
        # Largest first; ties in the order of the boxes, as before masks existed.
        found.sort(key=lambda item: (item[0], item[1]), reverse=True)
        found = found[: config.max_per_frame]
        if fine is not None and found:
            return self._refine_edges(fine, flat, labels, found)
        return [(box, _upsampled_mask(labels, index, box)) for _, box, index in found]

    def _refine_edges(
        self,
        image: np.ndarray,
        flat: np.ndarray,
        labels: np.ndarray,
        found: list[tuple[int, Box, int]],
    ) -> list[tuple[Box, np.ndarray]]:
        """Each particle's edge placed on a finer grid (_EDGE_SCALE): its pixels are those
        brighter than the local background by _EDGE_SHARE of the threshold and connected
        to the particle found at the working scale (hysteresis: the threshold finds the
        particle, half of it places its edge). At the working scale a needle 1-3 px wide
        is averaged over 4 x 4 px and falls below the threshold, so a bundle's faint and
        stray needles were cut off its box, and a working pixel is a 4 x 4 square, so
        every edge was off by up to 2 px. Where faint pixels join two particles, each
        keeps those within its own working-scale segment."""
        fine = _EDGE_SCALE
        step = _WORK_SCALE // fine  # a working pixel is step x step fine pixels
        rows, columns = labels.shape
        size = (columns * step, rows * step)
        level = cv2.resize(flat, size, interpolation=cv2.INTER_LINEAR)
        edge = max(1, round(_EDGE_SHARE * self._config.threshold))
        above = cv2.compare(image, cv2.add(level, edge), cv2.CMP_GT)
        # Closed as the simulator's truth is (5 x 5 px at frame resolution).
        above = cv2.morphologyEx(above, cv2.MORPH_CLOSE, self._edge_close)
        part_count, parts, part_stats, _ = cv2.connectedComponentsWithStatsWithAlgorithm(
            above, 8, cv2.CV_32S, cv2.CCL_BBDT
        )
        # Which faint parts each particle's segment meets (read at the centre of each of
        # its working pixels), and how many particles meet each.
        rank = np.zeros(int(labels.max()) + 1, np.uint16)  # max_per_frame < 2**16 - 1
        for number, (_, _, index) in enumerate(found, start=1):
            rank[index] = number
        ranks = np.take(rank, labels)
        under = parts[step // 2 :: step, step // 2 :: step][:rows, :columns]
        seeded = (ranks > 0) & (under > 0)
        slots = len(found) + 1
        present = np.zeros(part_count * slots, bool)
        present[under[seeded].astype(np.int64) * slots + ranks[seeded]] = True
        pairs = np.flatnonzero(present)
        part_of, particle = pairs // slots, pairs % slots
        meets = np.bincount(part_of, minlength=part_count)
        # Each fine pixel's particle: a part met by one particle is all its own; one met by
        # several is divided along their working-scale segments.
        owner = np.zeros(part_count, np.uint16)
        alone = meets[part_of] == 1
        owner[part_of[alone]] = particle[alone]
        owner[meets > 1] = _SHARED
        owned = np.take(owner, np.asarray(parts))
        segments = cv2.resize(ranks, size, interpolation=cv2.INTER_NEAREST)
        # (cv2's stubs type no scalar operand for compare; OpenCV takes one.)
        divided = cv2.compare(owned, _SHARED, cv2.CMP_EQ)  # type: ignore[call-overload]
        cv2.copyTo(segments, divided, owned)
        # The inside of each segment (its working pixels whose 4-neighbours are all its
        # own) is the particle's, faint or not: a textured agglomerate's dark grain
        # between its bright ones is part of it even where a gap joins it to the outside.
        inside = cv2.bitwise_and(
            cv2.compare(cv2.erode(ranks, self._cross), cv2.dilate(ranks, self._cross), cv2.CMP_EQ),
            cv2.compare(ranks, 0, cv2.CMP_GT),  # type: ignore[call-overload]
        )
        inside = cv2.resize(inside, size, interpolation=cv2.INTER_NEAREST)
        cv2.copyTo(segments, inside, owned)
        results = []
        for number, (_, box, index) in enumerate(found, start=1):
            own = part_of[(particle == number) & alone]
            # Where its pixels can be: its working box and the boxes of its own parts.
            x0, y0, w, h = (v // fine for v in box)
            x1, y1 = x0 + w, y0 + h
            if own.size:
                x0 = min(x0, int(part_stats[own, 0].min()))
                y0 = min(y0, int(part_stats[own, 1].min()))
                x1 = max(x1, int((part_stats[own, 0] + part_stats[own, 2]).max()))
                y1 = max(y1, int((part_stats[own, 1] + part_stats[own, 3]).max()))
            mask = cv2.compare(owned[y0:y1, x0:x1], number, cv2.CMP_EQ)  # type: ignore[call-overload]
            bx, by, bw, bh = cv2.boundingRect(mask)
            if bw == 0:
                results.append((box, _upsampled_mask(labels, index, box)))
                continue
            mask = mask[by : by + bh, bx : bx + bw] // 255
            if fine > 1:
                mask = cv2.resize(mask, (bw * fine, bh * fine), interpolation=cv2.INTER_NEAREST)
            results.append((((x0 + bx) * fine, (y0 + by) * fine, bw * fine, bh * fine), mask))
        return results

    def _detected(
        self, grey: np.ndarray, detector: ParticleDetector
    ) -> list[tuple[Box, np.ndarray]]:
        """separation = "learned" (or "auto" on a crowded frame): the detector's boxes.
        A particle's mask is the largest blob of the frame's foreground (above
        _EDGE_SHARE of the threshold, on the _EDGE_SCALE grid, as refine_edges places
        edges) among the pixels of its box it owns (see _CORE), closed, holes filled."""
        config = self._config
        height, width = grey.shape
        small = network_input(grey)
        detections = detector.detect(small, (height, width), config.max_per_frame)
        if not detections:
            return []
        fine_size = (width // _EDGE_SCALE, height // _EDGE_SCALE)
        fine = cv2.resize(grey, fine_size, interpolation=cv2.INTER_AREA)
        tiny = cv2.resize(small, (width // 16, height // 16), interpolation=cv2.INTER_AREA)
        level = cv2.resize(cv2.medianBlur(tiny, 9), fine_size, interpolation=cv2.INTER_LINEAR)
        edge = max(1, round(_EDGE_SHARE * config.threshold))
        above = cv2.compare(fine, cv2.add(level, edge), cv2.CMP_GT)
        # Closed once for the frame: an agglomerate's grains join; where the closing
        # bridges two particles, ownership below cuts the bridge again.
        above = cv2.morphologyEx(above, cv2.MORPH_CLOSE, self._detected_close)
        boxes = [_fine_box(d.box, fine_size) for d in detections]
        distances = [_box_distance(*fine_box) for fine_box in boxes]
        owner = _nearest_box(boxes, distances, fine_size)
        found = []
        for number, (box, (x0, y0, x1, y1)) in enumerate(
            zip((d.box for d in detections), boxes, strict=True)
        ):
            mine = (owner[y0:y1, x0:x1] == number) | (distances[number] < _CORE)
            own = cv2.bitwise_and(above[y0:y1, x0:x1], mine.view(np.uint8) * np.uint8(255))
            count, labels, stats, _ = cv2.connectedComponentsWithStats(own, connectivity=8)
            if count < 2:
                continue
            largest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
            own = _fill_holes((labels == largest).astype(np.uint8))
            area = int(own.sum()) * _EDGE_SCALE * _EDGE_SCALE
            if not config.min_area <= area <= config.max_area:
                continue
            if config.min_focus > 0 and _object_focus(grey, box) < config.min_focus:
                continue
            mask = cv2.resize(
                own,
                ((x1 - x0) * _EDGE_SCALE, (y1 - y0) * _EDGE_SCALE),
                interpolation=cv2.INTER_NEAREST,
            )
            offset_x, offset_y = box[0] - x0 * _EDGE_SCALE, box[1] - y0 * _EDGE_SCALE
            mask = mask[offset_y : offset_y + box[3], offset_x : offset_x + box[2]]
            found.append((area, box, np.ascontiguousarray(mask)))
        found.sort(key=lambda item: (item[0], item[1]), reverse=True)
        return [(box, mask) for _, box, mask in found]

    def _grow_alone(self, corrected: np.ndarray, mask: np.ndarray, threshold: int) -> np.ndarray:
        """Hysteresis for particles on their own: a blob grows into the dimmer pixels
        around it (above _LOW_SHARE of the threshold: a bundle's faint needles, a soft
        rim) unless that would join it to another blob, so a lone particle's box covers
        all of it and crowded ones are not glued together."""
        dim = (corrected > _LOW_SHARE * threshold).astype(np.uint8)
        low = cv2.morphologyEx(dim, cv2.MORPH_CLOSE, self._close)
        low_count, low_labels = cv2.connectedComponents(low, connectivity=4)
        high_count, high_labels = cv2.connectedComponents(mask, connectivity=4)
        if high_count <= 1:
            return mask
        # A blob lies within one low component (closing is monotone): one pixel of each
        # says which. The first pixel of each blob, in raster order, without a sort:
        flat = high_labels.ravel()
        first = np.zeros(high_count, np.intp)
        first[flat[::-1]] = np.arange(flat.size - 1, -1, -1)
        blobs_per_low = np.bincount(low_labels.ravel()[first[1:]], minlength=low_count)
        alone = (blobs_per_low == 1).astype(np.uint8)
        alone[0] = 0
        return np.asarray(np.maximum(mask, alone[low_labels]), np.uint8)

    def _separate(
        self,
        corrected: np.ndarray,
        mask: np.ndarray,
        count: int,
        labels: np.ndarray,
        stats: np.ndarray,
    ) -> tuple[int, np.ndarray, np.ndarray]:
        """Split the blobs that look merged; return the new (count, labels, stats), the
        blobs left whole keeping their labels and pixels."""
        distance = cv2.distanceTransform(mask, cv2.DIST_L2, 3)
        # Seeds: the maxima of the distance to the background (the deepest point within
        # _PEAK_RADIUS), at least _PEAK_MIN deep: a needle at this scale is 1-2 px wide
        # and never seeds on its own. Seeds too close to tell apart are merged below.
        local_max = cv2.dilate(distance, self._peak_window)
        peaks = (distance >= local_max) & (distance >= _PEAK_MIN)
        peak_count, peak_labels = cv2.connectedComponents(peaks.astype(np.uint8), connectivity=8)
        if peak_count <= 2:
            return count, labels, stats
        # Which blob each maximum lies in, and how many maxima each blob has.
        blob_of_peak = np.zeros(peak_count, np.int32)
        blob_of_peak[peak_labels[peaks]] = labels[peaks]
        per_blob = np.bincount(blob_of_peak[1:], minlength=count)
        merged = np.flatnonzero(per_blob >= 2)
        merged = merged[merged > 0]
        if merged.size == 0:
            return count, labels, stats
        # Work within the box around the merged blobs (plus 1 px: cv2.watershed makes
        # the image's outer pixels a boundary).
        x0 = max(0, int(stats[merged, 0].min()) - 1)
        y0 = max(0, int(stats[merged, 1].min()) - 1)
        x1 = min(mask.shape[1], int((stats[merged, 0] + stats[merged, 2]).max()) + 1)
        y1 = min(mask.shape[0], int((stats[merged, 1] + stats[merged, 3]).max()) + 1)
        roi = (slice(y0, y1), slice(x0, x1))
        is_merged = np.zeros(count, bool)
        is_merged[merged] = True
        in_merged = is_merged[labels[roi]]
        # Markers: one per maximum of a merged blob (2, 3, ...); every other pixel is
        # flooded, background included, so no pixel of a merged blob is left out.
        seeds = is_merged[blob_of_peak]
        seeds[0] = False
        seed_count = int(seeds.sum())
        seed_ids = np.zeros(peak_count, np.int32)
        seed_ids[seeds] = np.arange(2, 2 + seed_count, dtype=np.int32)
        seed_pixels = peaks[roi] & in_merged
        markers = np.zeros(in_merged.shape, np.int32)
        markers[seed_pixels] = seed_ids[peak_labels[roi][seed_pixels]]
        # cv2.watershed floods in the order of the grey-level step between neighbours.
        # Outside the merged blobs the relief is 0 and inside at least 128, a larger step
        # than any within a blob, so each blob is flooded from its own seeds before any
        # flood leaves it; the cut falls on the sharpest edges between the seeds.
        relief = np.where(in_merged, 128 + (corrected[roi] >> 2), 0).astype(np.uint8)
        cv2.watershed(cv2.cvtColor(relief, cv2.COLOR_GRAY2BGR), markers)
        # Only the merged blobs' pixels matter: the floods beyond them are dropped.
        markers[~in_merged] = 0
        parts = _merge_shallow_cuts(markers, distance[roi], 2 + seed_count)
        # Renumber: each split part gets a label after the blobs' (count, count + 1, ...).
        parts = np.where(parts >= 2, parts - 2 + count, 0).astype(np.float32)
        # The watershed lines (1 px, unassigned) join a neighbouring part.
        parts = np.where(in_merged & (parts == 0), cv2.dilate(parts, self._cross), parts)
        parts = parts.astype(np.int32)
        part_count = seed_count
        # A part never spans two blobs: a flood that left its blob through the
        # background is cut back to each blob it reached. (Checked cheaply: a part's
        # blob labels are all alike when their variance is zero.)
        blob = labels[roi][in_merged].astype(np.int64)
        own = parts[in_merged]
        pixels = np.bincount(own, minlength=count + seed_count).astype(np.float64)
        total = np.bincount(own, blob, minlength=count + seed_count)
        squares = np.bincount(own, blob * blob, minlength=count + seed_count)
        if np.any(squares[count:] * pixels[count:] != total[count:] ** 2):
            keys = own.astype(np.int64) * count + blob
            unique, inverse = np.unique(keys, return_inverse=True)
            assigned = unique >= count  # key < count: a pixel no part reached
            new_ids = np.where(assigned, count + np.cumsum(assigned) - 1, 0).astype(np.int32)
            parts = np.zeros(in_merged.shape, np.int32)
            parts[in_merged] = new_ids[inverse.ravel()]
            part_count = int(assigned.sum())
        combined = labels.copy()
        combined[roi][in_merged] = parts[in_merged]
        part_stats = _component_stats(parts, count + part_count)[count:]
        part_stats[:, 0] += x0
        part_stats[:, 1] += y0
        kept = stats.copy()
        kept[merged, 4] = 0  # the merged blobs live on as their parts
        return count + part_count, combined, np.concatenate([kept, part_stats])

    def sample(self, grey: np.ndarray) -> list[Crop]:
        return [
            Crop(_square_crop(grey, box, self._config.margin), box, mask)
            for box, mask in self.find_particle_masks(grey)
        ]


def _fine_box(box: Box, fine_size: tuple[int, int]) -> tuple[int, int, int, int]:
    """A frame box as (x0, y0, x1, y1) on the _EDGE_SCALE grid, covering it."""
    x0, y0 = box[0] // _EDGE_SCALE, box[1] // _EDGE_SCALE
    x1 = min(fine_size[0], -(-(box[0] + box[2]) // _EDGE_SCALE))
    y1 = min(fine_size[1], -(-(box[1] + box[3]) // _EDGE_SCALE))
    return x0, y0, x1, y1


def _nearest_box(
    boxes: list[tuple[int, int, int, int]], distances: list[np.ndarray], size: tuple[int, int]
) -> np.ndarray:
    """Each pixel's box (index into `boxes`, int32; -1 outside all): of the boxes that
    hold it, the one whose centre is nearest in units of the box's half sides
    (`distances`, each box's _box_distance). Where a
    needle crosses a bundle, each keeps the pixels nearer its own middle."""
    owner = np.full((size[1], size[0]), -1, np.int32)
    best = np.full((size[1], size[0]), np.inf, np.float32)
    for number, ((x0, y0, x1, y1), distance) in enumerate(zip(boxes, distances, strict=True)):
        nearer = distance < best[y0:y1, x0:x1]
        best[y0:y1, x0:x1][nearer] = distance[nearer]
        owner[y0:y1, x0:x1][nearer] = number
    return owner


def _box_distance(x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    """Each pixel's squared distance from the box's centre in units of its half sides
    (1 on the inscribed ellipse)."""
    half_w, half_h = max(1.0, (x1 - x0) / 2.0), max(1.0, (y1 - y0) / 2.0)
    across = ((np.arange(x1 - x0, dtype=np.float32) + 0.5 - half_w) / half_w) ** 2
    down = ((np.arange(y1 - y0, dtype=np.float32) + 0.5 - half_h) / half_h) ** 2
    return np.asarray(down[:, None] + across[None, :])


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """The mask with every hole filled (background not reachable from its edge): pores
    and gaps between needles inside a particle count to its area."""
    outside = np.zeros((mask.shape[0] + 2, mask.shape[1] + 2), np.uint8)
    outside[1:-1, 1:-1] = mask
    cv2.floodFill(outside, None, (0, 0), 2)
    return np.asarray((outside[1:-1, 1:-1] != 2).astype(np.uint8))


def _close_padded(mask: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """A morphological closing that treats the pixels beyond the mask as background."""
    pad = kernel.shape[0] // 2 + 1
    padded = cv2.copyMakeBorder(mask, pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=0)
    closed = cv2.morphologyEx(padded, cv2.MORPH_CLOSE, kernel)
    return np.asarray(closed[pad:-pad, pad:-pad])


def _merge_shallow_cuts(markers: np.ndarray, distance: np.ndarray, count: int) -> np.ndarray:
    """Undo the watershed's cuts that cross no neck: two parts stay apart only where the
    deepest point of the line between them (the pass, in distance-transform depth) is
    below _NECK_SHARE of the shallower part's depth. A bundle cut across its length
    (the pass about as deep as the bundle) is one particle again; two agglomerates
    touching at a narrow neck stay two. Returns markers relabelled (0 and -1 unchanged)."""
    depth = np.zeros(count, np.float32)
    inside = markers >= 2
    np.maximum.at(depth, markers[inside], distance[inside])
    area = np.bincount(markers[inside], minlength=count)
    lines = np.argwhere(markers == -1)
    height, width = markers.shape
    rows, columns = lines[:, 0], lines[:, 1]
    lines = lines[(rows > 0) & (rows < height - 1) & (columns > 0) & (columns < width - 1)]
    parent = np.arange(count)

    def root(label: int) -> int:
        while parent[label] != label:
            parent[label] = parent[parent[label]]
            label = int(parent[label])
        return label

    if len(lines):
        ys, xs = lines[:, 0], lines[:, 1]
        around = np.stack(
            [markers[ys + dy, xs + dx] for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1))], axis=1
        )
        around = np.where(around >= 2, around, 0)
        low = np.where(around > 0, around, np.iinfo(np.int32).max).min(axis=1)
        high = around.max(axis=1)
        crossing = (high > 0) & (low != high)
        # The pass between each pair of parts: the deepest line pixel between them.
        keys = low[crossing].astype(np.int64) * count + high[crossing]
        order = np.argsort(keys, kind="stable")
        keys = keys[order]
        values = distance[ys, xs][crossing][order]
        starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
        if starts.size:
            pair_keys = keys[starts]
            pass_depth = np.maximum.reduceat(values, starts)
            first, second = pair_keys // count, pair_keys % count
            shallower = np.minimum(depth[first], depth[second])
            smaller = np.minimum(area[first], area[second])
            join = (smaller < _MIN_PART_AREA) | (pass_depth >= _NECK_SHARE * shallower)
            for a, b in zip(first[join].tolist(), second[join].tolist(), strict=True):
                parent[root(a)] = root(b)
    roots = np.fromiter((root(label) for label in range(count)), np.int64, count)
    return np.where(markers >= 2, roots[np.maximum(markers, 0)], markers)


def _component_stats(labels: np.ndarray, count: int) -> np.ndarray:
    """connectedComponentsWithStats-style stats (x, y, w, h, area) for labels
    0..count-1; a label no pixel has gets zero area."""
    stats = np.zeros((count, 5), np.int64)
    ys, xs = np.nonzero(labels)
    ids = labels[ys, xs]
    stats[:, 4] = np.bincount(ids, minlength=count)
    present = stats[:, 4] > 0
    big = np.iinfo(np.int64).max
    x_min, y_min = np.full(count, big), np.full(count, big)
    x_max, y_max = np.full(count, -1), np.full(count, -1)
    np.minimum.at(x_min, ids, xs)
    np.minimum.at(y_min, ids, ys)
    np.maximum.at(x_max, ids, xs)
    np.maximum.at(y_max, ids, ys)
    stats[present, 0] = x_min[present]
    stats[present, 1] = y_min[present]
    stats[present, 2] = x_max[present] - x_min[present] + 1
    stats[present, 3] = y_max[present] - y_min[present] + 1
    return stats


def _upsampled_mask(labels: np.ndarray, index: int, box: Box, fill: bool = True) -> np.ndarray:
    """Segment `index` within its box at frame resolution (a working pixel -> a square),
    holes filled (unless not `fill`): a particle's size is its silhouette's, as in the
    simulator's truth."""
    x, y, w, h = (v // _WORK_SCALE for v in box)
    own = (labels[y : y + h, x : x + w] == index).astype(np.uint8)
    if fill:
        own = _fill_holes(own)
    return np.asarray(cv2.resize(own, (box[2], box[3]), interpolation=cv2.INTER_NEAREST))


def _object_focus(grey: np.ndarray, box: tuple[int, int, int, int]) -> float:
    x, y, w, h = box
    _, std = cv2.meanStdDev(cv2.Laplacian(grey[y : y + h, x : x + w], cv2.CV_32F))
    return float(std[0, 0]) ** 2


def _square_crop(grey: np.ndarray, box: tuple[int, int, int, int], margin: float) -> np.ndarray:
    """A square crop centred on the particle, like the single-particle crops models train on."""
    x, y, w, h = box
    side = int(max(w, h) * (1 + 2 * margin))
    cx, cy = x + w // 2, y + h // 2
    height, width = grey.shape
    side = min(side, height, width)
    left = min(max(0, cx - side // 2), width - side)
    top = min(max(0, cy - side // 2), height - side)
    return grey[top : top + side, left : left + side]


def create_sampler(probe: ProbeConfig) -> Sampler:
    if probe.sampling == "particles":
        return ParticleSampler(probe.particles)
    if probe.sampling == "tiles":
        return TileSampler(probe.tiles)
    return WholeImageSampler()
