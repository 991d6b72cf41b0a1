"""The inspection record: one table of fields from which every output is made.

An inspection leaves this machine as a JSON line (`inspect --out`, `watch`, the REST answer), a
summary.csv row, a Parquet row and a history-database row. Each is a projection of
``Inspection.to_record()``, and the fields, their types and what they mean are declared here once:
the Parquet schema is generated from this table, summary.csv takes its scalar columns from it,
and the tests check the history table and its migrations against it. A new field is added here
(and to ``to_record``) and nowhere else by hand.

JSON keeps one shape for compatibility: the image size is ``image_size: [width, height]``, which
the tables hold as ``width`` and ``height`` (``flat`` does that split).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Field:
    name: str
    # "text", "real", "integer" (pixel coordinates: 32 bits), "count" (pixel counts: 64 bits),
    # "regions" (a list of REGION_FIELDS), "timings" (stage -> milliseconds)
    kind: str
    nullable: bool
    doc: str
    summary: bool = False  # a column of summary.csv, as it is


FIELDS: tuple[Field, ...] = (
    Field("source", "text", False, "the image's path, or the name it was sent under", summary=True),
    Field("verdict", "text", False, "defect, good, or uncalibrated (a model without thresholds); error in tables for unreadable files",
          summary=True),
    Field("score", "real", False, "the decision score: above the threshold is a defect", summary=True),
    Field("normalised_score", "real", True, "logistic of (score - threshold) / spread of good scores: 0.5 at the threshold",
          summary=True),
    Field("confidence", "real", True, "|2 normalised - 1|: 0 at the threshold, towards 1 far from it", summary=True),
    Field("threshold", "real", True, "the image threshold the verdict was made with"),
    Field("severity", "real", False, "of the worst region, 0..1 (0 for a good part)", summary=True),
    Field("width", "integer", False, "image width in pixels (JSON: image_size[0])"),
    Field("height", "integer", False, "image height in pixels (JSON: image_size[1])"),
    Field("regions", "regions", False, "the defect regions, largest evidence first"),
    Field("timings_ms", "timings", False, "milliseconds per stage: decode, backbone, search, postprocess, decide"),
    Field("model", "text", False, "the model's name"),
)

REGION_FIELDS: tuple[Field, ...] = (
    Field("x0", "integer", False, "box left, image pixels (JSON: box[0])"),
    Field("y0", "integer", False, "box top (JSON: box[1])"),
    Field("x1", "integer", False, "box right, exclusive (JSON: box[2])"),
    Field("y1", "integer", False, "box bottom, exclusive (JSON: box[3])"),
    Field("area_px", "count", False, "pixels in the region's mask"),
    Field("area_pct", "real", False, "share of the image, in %"),
    Field("mean_score", "real", False, "mean anomaly-map value over the region"),
    Field("max_score", "real", False, "peak anomaly-map value"),
    Field("elongation", "real", False, "major / minor axis of the region's ellipse"),
    Field("severity", "real", False, "0.7 x peak past the pixel threshold + 0.3 x size, 0..1"),
    Field("type", "text", False, "defect type: a learned prototype's name, or a shape heuristic's"),
    Field("type_source", "text", False, "prototype or heuristic"),
    Field("type_confidence", "real", True, "the prototype classifier's probability (heuristic: null)"),
)

# Fields batch outputs add to a record: where its pictures went, or why there is no inspection
BATCH_FIELDS: tuple[Field, ...] = (
    Field("overlay", "text", True, "the overlay picture written for it (inspect --out)"),
    Field("map", "text", True, "the saved anomaly map (inspect --out --save-maps)"),
    Field("error", "text", True, "why the file could not be inspected (then only source is set)", summary=True),
)


def flat(record: dict) -> dict:
    """A JSON record with the image size split into the tables' width and height."""
    out = {k: v for k, v in record.items() if k != "image_size"}
    out["width"], out["height"] = record["image_size"]
    return out


BOX = ("x0", "y0", "x1", "y1")  # the region fields JSON holds as one "box" list


def flat_region(region: dict) -> dict:
    """A JSON region with its box split into the tables' x0, y0, x1, y1."""
    return {**dict(zip(BOX, region["box"], strict=True)), **{f.name: region[f.name] for f in REGION_FIELDS if f.name not in BOX}}


def json_keys() -> list[str]:
    """The keys of ``Inspection.to_record()``, in order."""
    keys = []
    for f in FIELDS:
        if f.name == "width":
            keys.append("image_size")
        elif f.name != "height":
            keys.append(f.name)
    return keys
