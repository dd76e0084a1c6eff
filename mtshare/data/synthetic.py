"""Procedural scenes written in the real PASCAL-Context / NYUD_MT on-disk layouts.

Each image is ray-cast from a pin-hole camera (no tilt, so the horizon is the
principal row) standing ``cam_height`` above a ground plane:

- a checker-textured floor, with a brick wall behind it (PASCAL: sometimes sky
  instead of the wall), so depth grows towards the horizon;
- 1-3 objects of four classes, each with its own colour: red and blue boxes, green
  and yellow spheres, resting on the floor;
- in ~40% of the images 1-2 person figures facing the camera, built from a head
  sphere (with hair), neck, torso box, upper/lower arm and leg cylinders, hands and
  feet; every part group has its own colour so parts are visually separable;
- NYUD only: sometimes an unlabelled "clutter" panel on the wall (void, no depth).

A z-buffer over the analytic primitives gives depth (distance along the optical
axis, metres) and exact normals; colours are Lambert-shaded with mild noise.
Normals use x right, y up, z towards the camera. Saliency = objects and persons;
edges = thinned semantic boundaries of the label map (as the loaders derive them).

Sequences (video): the same scene rendered frame after frame while the camera moves
(sideways and slowly forwards; or not at all: ``camera="static"``) and every object and
person moves sideways at its own speed. Each frame is ray-cast anew, so labels, depth and
normals follow the motion exactly; the sensor noise is fresh in every frame.

Everything is a pure function of ``seed``: the same call writes byte-identical
files (.mat headers carry a fixed text instead of the time of writing).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.io
from PIL import Image

from mtshare.data import DataError
from mtshare.data.pascal_context import (
    NORMALS_VALID_CLASSES,
    PART_GROUPS,
    VOC_CLASSES,
    edges_from_label_map,
)

LAYOUTS = ("pascal_context", "nyud")
VAL_FRACTION = 0.25
PERSON_FRACTION = 0.4


@dataclass(frozen=True)
class Kind:
    """One synthetic surface class and its label in each layout."""

    name: str
    colour: tuple[int, int, int]
    voc: int  # PASCAL semseg id (0 background)
    context: int  # PASCAL-Context LabelMap id (1..459; 0 unlabelled)
    nyud: int  # NYUD segmentation file value (1..40; 0 void)


KINDS = (
    Kind("sky", (150, 190, 235), voc=0, context=360, nyud=0),  # PASCAL only; no valid normals
    Kind("wall", (170, 165, 150), voc=0, context=440, nyud=1),
    Kind("floor", (140, 115, 85), voc=0, context=158, nyud=2),
    Kind("red_box", (200, 40, 40), voc=7, context=59, nyud=3),  # car / cabinet
    Kind("blue_box", (40, 70, 210), voc=20, context=427, nyud=25),  # tvmonitor / television
    Kind("green_ball", (50, 170, 60), voc=5, context=34, nyud=18),  # bottle / pillow
    Kind("yellow_ball", (225, 205, 40), voc=12, context=113, nyud=35),  # dog / lamp
    Kind("person", (0, 0, 0), voc=15, context=284, nyud=31),  # colour comes from the parts
    Kind("clutter", (0, 0, 0), voc=0, context=0, nyud=0),  # NYUD void; random colour
)
SKY, WALL, FLOOR, RED_BOX, BLUE_BOX, GREEN_BALL, YELLOW_BALL, PERSON, CLUTTER = range(len(KINDS))
OBJECT_KINDS = (RED_BOX, BLUE_BOX, GREEN_BALL, YELLOW_BALL)
FOREGROUND = (*OBJECT_KINDS, PERSON)

# The surfaces the PASCAL loader keeps normals on must be in its valid-class list.
assert all(KINDS[k].context in NORMALS_VALID_CLASSES for k in (WALL, FLOOR, *FOREGROUND))
assert KINDS[SKY].context not in NORMALS_VALID_CLASSES

# One colour per part group (see PART_GROUPS), so the 6 groups are separable by colour.
_GROUP_COLOURS = {
    1: (235, 180, 140),  # head: skin (hair gets its own dark colour)
    2: (40, 190, 190),  # torso and neck: teal shirt
    3: (150, 70, 200),  # upper arms: purple sleeves
    4: (240, 130, 175),  # lower arms and hands: pink
    5: (45, 45, 50),  # upper legs: dark trousers
    6: (235, 235, 235),  # lower legs and feet: white
}
_HAIR_COLOUR = (50, 30, 20)
PART_NAMES = tuple(PART_GROUPS)
_LIGHT = np.array([-0.4, 0.8, -0.5]) / np.linalg.norm([-0.4, 0.8, -0.5])


# --- ray casting (camera at the origin, y up, z forward; t = depth along z) --------


def _sphere(rays: np.ndarray, centre, radius: float):
    centre = np.asarray(centre, dtype=np.float64)
    a = (rays**2).sum(-1)
    b = rays @ centre
    disc = b**2 - a * (centre @ centre - radius**2)
    t = (b - np.sqrt(np.maximum(disc, 0))) / a
    t = np.where((disc > 0) & (t > 0), t, np.inf)
    return t, (rays * t[..., None] - centre) / radius


def _box(rays: np.ndarray, lo, hi):
    lo, hi = np.asarray(lo, dtype=np.float64), np.asarray(hi, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        t1, t2 = lo / rays, hi / rays
    near, far = np.minimum(t1, t2), np.maximum(t1, t2)
    near = np.nan_to_num(near, nan=-np.inf)
    far = np.nan_to_num(far, nan=np.inf)
    t_near, t_far = near.max(-1), far.min(-1)
    t = np.where((t_near <= t_far) & (t_near > 0), t_near, np.inf)
    axis = near.argmax(-1)
    normal = np.zeros(rays.shape)
    sign = -np.sign(np.take_along_axis(rays, axis[..., None], -1))[..., 0]
    np.put_along_axis(normal, axis[..., None], sign[..., None], -1)
    return t, normal


def _cylinder(rays: np.ndarray, x: float, z: float, radius: float, y0: float, y1: float):
    """Vertical cylinder (side surface only: caps hide inside the adjoining parts)."""
    dx, dy, dz = rays[..., 0], rays[..., 1], rays[..., 2]
    a = dx**2 + dz**2
    b = dx * x + dz * z
    disc = b**2 - a * (x**2 + z**2 - radius**2)
    t = (b - np.sqrt(np.maximum(disc, 0))) / a
    y = t * dy
    t = np.where((disc > 0) & (t > 0) & (y >= y0) & (y <= y1), t, np.inf)
    hit_t = np.where(np.isfinite(t), t, 0)
    normal = np.stack([(hit_t * dx - x) / radius, np.zeros_like(t), (hit_t * dz - z) / radius], -1)
    return t, normal


@dataclass(frozen=True)
class Motion:
    """Where one frame of a sequence is in time.

    ``camera``: the camera's velocity (x, z) in metres per frame; ``seed``: seeds the objects'
    velocities (drawn in instance order, so the same for every frame of the sequence) and,
    with ``frame``, the frame's own sensor noise."""

    frame: int
    camera: tuple[float, float]
    seed: tuple[int, ...]


OBJECT_SPEED = (0.02, 0.06)  # metres per frame, sideways, either direction


class _Scene:
    """Z-buffered render target: depth, kind, normal, albedo, part and instance maps."""

    def __init__(self, size: int, rng: np.random.Generator, motion: Motion | None = None):
        self.motion = motion
        self.cam = (0.0, 0.0) if motion is None else (motion.camera[0] * motion.frame, motion.camera[1] * motion.frame)
        self._velocity_rng = None if motion is None else np.random.default_rng([*motion.seed, 0])
        self.velocity: list[float] = []  # sideways speed of each instance
        self.size = size
        self.focal = 0.9 * size
        self.horizon = size * rng.uniform(0.3, 0.45)
        self.cam_height = rng.uniform(1.3, 1.6)
        pix = np.arange(size) + 0.5
        u = np.broadcast_to((pix - size / 2) / self.focal, (size, size))
        v = np.broadcast_to(-(pix[:, None] - self.horizon) / self.focal, (size, size))
        self.rays = np.stack([u, v, np.ones((size, size))], -1)
        self.depth = np.full((size, size), np.inf)
        self.kind = np.full((size, size), SKY)
        self.normal = np.zeros((size, size, 3))
        self.albedo = np.tile(np.array(KINDS[SKY].colour, dtype=np.float64), (size, size, 1))
        self.part = np.full((size, size), -1)  # index into PART_NAMES
        self.inst = np.full((size, size), -1)
        self.instances: list[int] = []  # kind of each instance id
        self.rgb = np.zeros((size, size, 3), dtype=np.uint8)  # final colours, set by render()

    def hits(self, t: np.ndarray) -> np.ndarray:
        """World coordinates of the ray hits at parameter t."""
        return self.rays * np.where(np.isfinite(t), t, 0)[..., None]

    def draw(self, t, normal, kind, albedo, part=-1, inst=-1) -> None:
        front = t < self.depth
        self.depth[front] = t[front]
        self.kind[front] = kind
        self.normal[front] = normal[front]
        self.albedo[front] = np.broadcast_to(albedo, self.albedo.shape)[front]
        self.part[front] = np.broadcast_to(part, front.shape)[front]
        self.inst[front] = inst

    def new_instance(self, kind: int) -> int:
        self.instances.append(kind)
        if self._velocity_rng is not None:
            self.velocity.append(self._velocity_rng.uniform(*OBJECT_SPEED) * self._velocity_rng.choice((-1, 1)))
        return len(self.instances) - 1

    def place(self, inst: int, x: float, z: float) -> tuple[float, float]:
        """An instance's world position (x, z) at frame 0 -> camera coordinates at this frame."""
        if self.motion is None:
            return x, z
        return x + self.velocity[inst] * self.motion.frame - self.cam[0], z - self.cam[1]

    def visible_x(self, z: float, margin: float = 0.8) -> float:
        """Half-width (metres) of the view at depth z, shrunk by ``margin``."""
        return margin * z * (self.size / 2) / self.focal


def _colour(rgb, jitter: np.ndarray) -> np.ndarray:
    return np.asarray(rgb, dtype=np.float64) + jitter


def _draw_room(scene: _Scene, wall_depth: float | None, rng) -> None:
    ground = -scene.cam_height
    with np.errstate(divide="ignore"):
        t = np.where(scene.rays[..., 1] < 0, ground / scene.rays[..., 1], np.inf)
    if wall_depth is not None:
        wall_depth -= scene.cam[1]
        t = np.where(t < wall_depth, t, np.inf)
    p = scene.hits(t)
    wx, wz = p[..., 0] + scene.cam[0], p[..., 2] + scene.cam[1]  # world coordinates: the floor stays put
    checker = (np.floor(wx / 0.5) + np.floor(wz / 0.5)) % 2
    floor_rgb = _colour(KINDS[FLOOR].colour, rng.normal(0, 6, 3))
    albedo = floor_rgb * (1 - 0.2 * checker)[..., None]
    scene.draw(t, np.broadcast_to([0.0, 1.0, 0.0], p.shape), FLOOR, albedo)
    if wall_depth is None:
        return
    t = np.full(t.shape, wall_depth)
    p = scene.hits(t)
    row = np.floor((p[..., 1] - ground) / 0.25)
    col = (p[..., 0] + scene.cam[0] + 0.25 * (row % 2)) / 0.5
    mortar = ((p[..., 1] - ground) % 0.25 < 0.03) | (col % 1 < 0.06)
    albedo = _colour(KINDS[WALL].colour, rng.normal(0, 6, 3)) * (1 - 0.15 * mortar)[..., None]
    scene.draw(t, np.broadcast_to([0.0, 0.0, -1.0], p.shape), WALL, albedo)


def _draw_object(scene: _Scene, kind: int, far: float, rng) -> None:
    ground = -scene.cam_height
    z = rng.uniform(2.2, far)
    x = rng.uniform(-1, 1) * scene.visible_x(z)
    inst = scene.new_instance(kind)
    x, z = scene.place(inst, x, z)
    colour = _colour(KINDS[kind].colour, rng.normal(0, 6, 3))
    if kind in (RED_BOX, BLUE_BOX):
        w, h, d = rng.uniform(0.5, 1.2), rng.uniform(0.4, 1.1), rng.uniform(0.4, 1.0)
        t, n = _box(scene.rays, [x - w / 2, ground, z], [x + w / 2, ground + h, z + d])
    else:
        r = rng.uniform(0.3, 0.6)
        t, n = _sphere(scene.rays, [x, ground + r, z + r], r)
    scene.draw(t, n, kind, colour, inst=inst)


def _draw_person(scene: _Scene, rng) -> None:
    """A standing figure facing the camera: its left side is on the image's right."""
    ground = -scene.cam_height
    z = rng.uniform(2.2, 4.0)
    x = rng.uniform(-1, 1) * scene.visible_x(z, 0.7)
    s = rng.uniform(1.6, 1.85) / 1.75  # body scale
    inst = scene.new_instance(PERSON)
    x, z = scene.place(inst, x, z)
    jitter = rng.normal(0, 6, 3)
    arm_out = 0.29 + rng.uniform(0, 0.05)

    def part(name: str, t, n, colour=None) -> None:
        colour = _GROUP_COLOURS[PART_GROUPS[name]] if colour is None else colour
        scene.draw(t, n, PERSON, _colour(colour, jitter), PART_NAMES.index(name), inst)

    def cyl(name: str, dx: float, radius: float, y0: float, y1: float) -> None:
        t, n = _cylinder(scene.rays, x + dx * s, z, radius * s, ground + y0 * s, ground + y1 * s)
        part(name, t, n)

    for side, sign in (("l", 1), ("r", -1)):
        foot_lo = [x + (sign * 0.11 - 0.06) * s, ground, z - 0.2 * s]
        foot_hi = [x + (sign * 0.11 + 0.06) * s, ground + 0.08 * s, z + 0.05 * s]
        part(f"{side}foot", *_box(scene.rays, foot_lo, foot_hi))
        cyl(f"{side}lleg", sign * 0.11, 0.07, 0.08, 0.5)
        cyl(f"{side}uleg", sign * 0.11, 0.085, 0.5, 0.92)
        cyl(f"{side}uarm", sign * arm_out, 0.065, 1.12, 1.43)
        cyl(f"{side}larm", sign * arm_out, 0.055, 0.86, 1.12)
        hand = [x + sign * arm_out * s, ground + 0.81 * s, z]
        part(f"{side}hand", *_sphere(scene.rays, hand, 0.065 * s))
    torso_lo = [x - 0.22 * s, ground + 0.9 * s, z - 0.12 * s]
    torso_hi = [x + 0.22 * s, ground + 1.45 * s, z + 0.12 * s]
    part("torso", *_box(scene.rays, torso_lo, torso_hi))
    cyl("neck", 0.0, 0.06, 1.44, 1.56)
    centre = np.array([x, ground + 1.66 * s, z])
    t, n = _sphere(scene.rays, centre, 0.12 * s)
    # Hair caps the upper part of the head sphere: a second part name in group 1.
    hair = scene.hits(t)[..., 1] > centre[1] + 0.03 * s
    part("head", np.where(hair, np.inf, t), n)
    part("hair", np.where(hair, t, np.inf), n, _HAIR_COLOUR)


def _draw_clutter(scene: _Scene, wall_depth: float, rng) -> None:
    """An unlabelled panel just in front of the wall (NYUD void, no depth)."""
    ground = -scene.cam_height
    x, y = rng.uniform(-1, 1) * scene.visible_x(wall_depth, 0.6), rng.uniform(1.0, 2.0)
    w, h = rng.uniform(0.4, 1.0), rng.uniform(0.3, 0.8)
    x, wall_depth = x - scene.cam[0], wall_depth - scene.cam[1]  # fixed to the wall
    lo = [x - w / 2, ground + y, wall_depth - 0.05]
    hi = [x + w / 2, ground + y + h, wall_depth - 0.01]
    scene.draw(*_box(scene.rays, lo, hi), CLUTTER, rng.uniform(30, 230, 3))


def render(size: int, rng: np.random.Generator, layout: str, persons: int, motion: Motion | None = None) -> _Scene:
    """Render one scene (at ``motion``'s frame: re-seed ``rng`` identically for every frame of a
    sequence); returns the z-buffered scene with the final colours in ``rgb``."""
    scene = _Scene(size, rng, motion)
    outdoor = layout == "pascal_context" and rng.random() < 0.4
    wall_depth = None if outdoor else rng.uniform(5.0, 8.0)
    _draw_room(scene, wall_depth, rng)
    far = 8.0 if wall_depth is None else wall_depth - 1.0
    for _ in range(rng.integers(1, 4)):
        _draw_object(scene, OBJECT_KINDS[rng.integers(len(OBJECT_KINDS))], far, rng)
    for _ in range(persons):
        _draw_person(scene, rng)
    if layout == "nyud" and rng.random() < 0.5:
        _draw_clutter(scene, wall_depth, rng)
    shade = 0.55 + 0.45 * np.clip(scene.normal @ _LIGHT, 0, 1)
    sky_gradient = 1.0 - 0.3 * np.linspace(0, 1, size)[:, None]  # brighter at the top
    shade = np.where(scene.kind == SKY, sky_gradient, shade)
    light = rng.uniform(0.85, 1.1)
    noise_rng = rng if motion is None else np.random.default_rng([*motion.seed, 1, motion.frame])
    rgb = scene.albedo * shade[..., None] * light + noise_rng.normal(0, 5, scene.albedo.shape)
    scene.rgb = np.clip(rgb, 0, 255).round().astype(np.uint8)
    return scene


# --- writers -------------------------------------------------------------------------

_MAT_HEADER = b"MATLAB 5.0 MAT-file, Platform: posix, Created by: mtshare.data.synthetic"


def _save_mat(path: Path, variables: dict) -> None:
    """savemat with a fixed header text, so that equal data gives equal bytes."""
    buf = io.BytesIO()
    scipy.io.savemat(buf, variables, do_compression=True)
    data = bytearray(buf.getvalue())
    data[:116] = _MAT_HEADER.ljust(116, b" ")
    path.write_bytes(bytes(data))


def _voc_palette() -> list[int]:
    palette = []
    for label in range(256):
        rgb, c = [0, 0, 0], label
        for shift in range(7, -1, -1):
            for ch in range(3):
                rgb[ch] |= ((c >> ch) & 1) << shift
            c >>= 3
        palette += rgb
    return palette


_VOC_PALETTE = _voc_palette()


def _lookup(scene: _Scene, field: str) -> np.ndarray:
    return np.array([getattr(k, field) for k in KINDS])[scene.kind]


def _normals_out(scene: _Scene) -> np.ndarray:
    """x right, y up, z towards the camera (forward-z flipped)."""
    return (scene.normal * np.array([1.0, 1.0, -1.0])).astype(np.float32)


def _person_parts_struct(scene: _Scene, im_id: str) -> np.ndarray:
    """The PASCAL-Part ``anno`` struct: objects (class, class_ind, mask, parts)."""
    part_dtype = [("part_name", "O"), ("mask", "O")]
    obj_dtype = [("class", "O"), ("class_ind", "O"), ("mask", "O"), ("parts", "O")]
    objects = []
    for inst, kind in enumerate(scene.instances):
        mask = scene.inst == inst
        if not mask.any():
            continue
        parts = np.zeros((0, 0))
        if kind == PERSON:
            names = [n for n in PART_NAMES if (mask & (scene.part == PART_NAMES.index(n))).any()]
            if names:
                parts = np.empty((1, len(names)), dtype=part_dtype)
                for k, name in enumerate(names):
                    part_mask = mask & (scene.part == PART_NAMES.index(name))
                    parts[0, k] = (name, part_mask.astype(np.uint8))
        voc = KINDS[kind].voc
        objects.append((VOC_CLASSES[voc], np.array([[float(voc)]]), mask.astype(np.uint8), parts))
    struct = np.empty((1, len(objects)), dtype=obj_dtype)
    for k, obj in enumerate(objects):
        struct[0, k] = obj
    anno = np.empty((1, 1), dtype=[("imname", "O"), ("objects", "O")])
    anno[0, 0] = (f"{im_id}.jpg", struct)
    return anno


def _write_pascal(root: Path, im_id: str, scene: _Scene) -> None:
    Image.fromarray(scene.rgb).save(root / "JPEGImages" / f"{im_id}.jpg", quality=95)
    semseg = Image.fromarray(_lookup(scene, "voc").astype(np.uint8))
    semseg.putpalette(_VOC_PALETTE)  # "L" -> "P" with the VOC colours, as VOC pngs are
    semseg.save(root / "semseg" / "pascal-context" / f"{im_id}.png")
    label_map = _lookup(scene, "context").astype(np.uint16)
    _save_mat(root / "pascal-context" / "trainval" / f"{im_id}.mat", {"LabelMap": label_map})
    _save_mat(root / "human_parts" / f"{im_id}.mat", {"anno": _person_parts_struct(scene, im_id)})
    normals = _normals_out(scene)
    normals[scene.kind == SKY] = (0.0, 0.0, 1.0)  # distilled normals exist everywhere
    png = np.clip(np.round((normals + 1) / 2 * 255), 0, 255).astype(np.uint8)
    Image.fromarray(png).save(root / "normals_distill" / f"{im_id}.png")
    sal = np.isin(scene.kind, FOREGROUND).astype(np.uint8) * 255
    Image.fromarray(sal).save(root / "sal_distill" / f"{im_id}.png")


def _write_nyud(root: Path, im_id: str, scene: _Scene) -> None:
    Image.fromarray(scene.rgb).save(root / "images" / f"{im_id}.jpg", quality=95)
    seg = _lookup(scene, "nyud").astype(np.uint8)
    Image.fromarray(seg).save(root / "segmentation" / f"{im_id}.png")
    void = scene.kind == CLUTTER
    depth = np.where(void | ~np.isfinite(scene.depth), 0.0, scene.depth).astype(np.float32)
    np.save(root / "depth" / f"{im_id}.npy", depth)
    normals = np.where(void[..., None], 0.0, _normals_out(scene)).astype(np.float32)
    np.save(root / "normals" / f"{im_id}.npy", normals)
    np.save(root / "edge" / f"{im_id}.npy", edges_from_label_map(seg).astype(np.float32))


_DIRS = {
    "pascal_context": ("JPEGImages", "ImageSets/Context", "semseg/pascal-context",
                       "pascal-context/trainval", "human_parts", "normals_distill", "sal_distill"),
    "nyud": ("images", "gt_sets", "segmentation", "depth", "normals", "edge"),
}  # fmt: skip


def _plan(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Per image: is it in val, and how many persons (>= 1 person image per split)."""
    val = np.zeros(n, dtype=bool)
    val[rng.choice(n, max(1, round(n * VAL_FRACTION)), replace=False)] = True
    persons = np.zeros(n, dtype=np.int64)
    for members in (np.flatnonzero(~val), np.flatnonzero(val)):
        chosen = rng.choice(members, max(1, round(len(members) * PERSON_FRACTION)), replace=False)
        persons[chosen] = 1 + (rng.random(len(chosen)) < 0.3)
    return val, persons


def _check_args(layout: str, size: int, **counts: tuple[int, int, str]) -> None:
    """DataError naming the first bad argument; ``counts``: name -> (value, minimum, what)."""
    if layout not in LAYOUTS:
        raise DataError(f"layout: unknown layout {layout!r} (known: {', '.join(LAYOUTS)})")
    for name, (value, minimum, what) in counts.items():
        if value < minimum:
            raise DataError(f"{name}: need at least {minimum} {what}, got {value}")
    if size < 16:
        raise DataError(f"size: need at least 16 pixels, got {size}")


def synthesize(layout: str, out: str | Path, n: int = 32, size: int = 64, seed: int = 0) -> Path:
    """Write ``n`` synthetic images (``size`` x ``size``) in ``layout``'s real layout.

    About 25% of the ids go to val; about 40% of each split shows persons with parts.
    Returns the dataset root (``out``).
    """
    _check_args(layout, size, n=(n, 2, "images (one per split)"))
    root = Path(out)
    for sub in _DIRS[layout]:
        (root / sub).mkdir(parents=True, exist_ok=True)
    # Distinct seed sequences for the plan and for every image.
    val, persons = _plan(n, np.random.default_rng([seed, 0, n]))
    ids = [f"2008_{i + 1:06d}" if layout == "pascal_context" else f"{i + 1:04d}" for i in range(n)]
    write = _write_pascal if layout == "pascal_context" else _write_nyud
    for i, im_id in enumerate(ids):
        scene = render(size, np.random.default_rng([seed, 1, i]), layout, int(persons[i]))
        write(root, im_id, scene)
    split_dir = root / ("ImageSets/Context" if layout == "pascal_context" else "gt_sets")
    for split, in_split in (("train", ~val), ("val", val)):
        listed = [im_id for im_id, keep in zip(ids, in_split) if keep]
        (split_dir / f"{split}.txt").write_text("".join(f"{i}\n" for i in listed))
    return root


CAMERAS = ("moving", "static")


def synthesize_sequences(layout: str, out: str | Path, sequences: int = 4, frames: int = 16, size: int = 64,
                         seed: int = 0, camera: str = "moving") -> Path:
    """Write ``sequences`` synthetic frame sequences of ``frames`` frames each in ``layout``'s
    layout, every frame labelled. A frame's id is ``<sequence>/<frame>`` (``seq0003/000012``), so
    every folder of the layout holds one folder of numbered frames per sequence, and the split
    files list frame ids, in order (docs: README "Data preparation" → frame sequences).

    The camera moves sideways and slowly forwards (``camera="moving"``) or stands still
    (``"static"``); objects and persons move sideways. About 25% of the sequences go to val.
    """
    _check_args(layout, size, sequences=(sequences, 2, "sequences (one per split)"),
                frames=(frames, 2, "frames per sequence"))
    if camera not in CAMERAS:
        raise DataError(f"camera: unknown camera motion {camera!r} (known: {', '.join(CAMERAS)})")
    root = Path(out)
    val, persons = _plan(sequences, np.random.default_rng([seed, 0, sequences, frames]))
    write = _write_pascal if layout == "pascal_context" else _write_nyud
    listed: dict[bool, list[str]] = {False: [], True: []}
    for s in range(sequences):
        name = f"seq{s + 1:04d}"
        for sub in _DIRS[layout]:
            (root / sub / name).mkdir(parents=True, exist_ok=True)
        motion_rng = np.random.default_rng([seed, 2, s])
        if camera == "static":
            velocity = (0.0, 0.0)
        else:  # sideways, and forwards by at most 1 m over the sequence (objects stay in front)
            velocity = (motion_rng.uniform(0.02, 0.05) * motion_rng.choice((-1, 1)), motion_rng.uniform(0, 1.0 / frames))
        for f in range(frames):
            motion = Motion(frame=f, camera=velocity, seed=(seed, 3, s))
            scene = render(size, np.random.default_rng([seed, 1, s]), layout, int(persons[s]), motion)
            im_id = f"{name}/{f:06d}"
            write(root, im_id, scene)
            listed[bool(val[s])].append(im_id)
    split_dir = root / ("ImageSets/Context" if layout == "pascal_context" else "gt_sets")
    split_dir.mkdir(parents=True, exist_ok=True)
    for split, in_val in (("train", False), ("val", True)):
        (split_dir / f"{split}.txt").write_text("".join(f"{i}\n" for i in listed[in_val]))
    return root
