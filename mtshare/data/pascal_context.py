"""PASCAL-Context multi-task loader (the ATRC / InvPT / ASTMT release layout).

Root layout::

    JPEGImages/<id>.jpg
    ImageSets/Context/{train,val}.txt
    semseg/pascal-context/<id>.png   (or semseg/VOC12/<id>.png) 21 VOC classes, 255 ignore
    pascal-context/trainval/<id>.mat  variable LabelMap: the 459 PASCAL-Context classes
    human_parts/<id>.mat              variable anno: PASCAL-Part struct (one per image, persons or not)
    normals_distill/<id>.png          RGB, normal = 2 v / 255 - 1
    sal_distill/<id>.png              grey, salient where v / 255 > 0.5

Derived labels, as in the reference code:
- edges: thinned non-zero Laplacian of LabelMap (1-pixel semantic boundaries);
- normals: kept only on pixels whose context class has an NYUD counterpart
  (``NORMALS_VALID_CLASSES``), zero elsewhere;
- human parts: PASCAL-Part person parts grouped into 6; images without a person
  with parts are all 255 (ignored).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy import ndimage
from torch.utils.data import Dataset

from mtshare.data import DataError, DatasetInfo, read_ids, read_image, read_mat
from mtshare.data.transforms import prepare

INFO = DatasetInfo(
    name="pascal_context",
    tasks=("semseg", "human_parts", "sal", "normals", "edge"),
    num_semseg_classes=21,
    edge_tolerance=0.0075,
    default_size=512,
)

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
    "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
    "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip
PERSON = 15
NUM_CONTEXT_CLASSES = 459

# PASCAL-Context class id -> name, for the classes whose name also appears in the NYUD
# label list (except "unknown"), plus tvmonitor: the reference code's normals_valid_classes,
# i.e. the surfaces the distilled (NYUD-trained) normals are trusted on.
NORMALS_VALID_CLASSES: dict[int, str] = {
    3: "air conditioner", 4: "antenna", 6: "ashtray", 9: "bag", 10: "ball", 11: "balloon",
    13: "barrel", 15: "basket", 17: "bathtub", 18: "bed", 22: "bench", 23: "bicycle",
    29: "blackboard", 30: "board", 33: "book", 34: "bottle", 36: "bowl", 37: "box",
    38: "bracelet", 39: "brick", 41: "broom", 43: "bucket", 46: "cabinet", 49: "cake",
    50: "calculator", 51: "calendar", 53: "camera", 55: "can", 56: "candle", 59: "car",
    61: "cart", 62: "case", 65: "cat", 66: "cd", 68: "ceiling", 69: "cell phone", 72: "chair",
    73: "chessboard", 78: "clock", 83: "coffee machine", 84: "comb", 85: "computer",
    87: "cone", 88: "container", 95: "corkscrew", 96: "counter", 101: "crate", 104: "cup",
    105: "curtain", 107: "cutting board", 111: "dishwasher", 113: "dog", 115: "door",
    122: "drum", 124: "duck", 135: "envelope", 141: "fan", 142: "faucet", 143: "fax machine",
    146: "fire extinguisher", 150: "fish tank", 154: "flag", 157: "flashlight", 158: "floor",
    159: "flower", 165: "fork", 172: "fruit", 174: "furnace", 181: "glass", 183: "globe",
    184: "glove", 191: "guitar", 193: "hammer", 195: "handle", 197: "hanger", 199: "hat",
    202: "heater", 213: "ipod", 215: "ironing board", 216: "jar", 219: "key", 220: "keyboard",
    223: "knife", 225: "ladder", 228: "laptop", 230: "lid", 232: "light", 233: "light bulb",
    238: "lock", 239: "machine", 242: "map", 243: "mask", 246: "mattress", 250: "microphone",
    251: "microwave", 252: "mirror", 255: "money", 260: "mouse", 261: "mouse pad",
    263: "napkin", 269: "oven", 272: "pan", 273: "paper", 275: "paper cutter", 281: "pen",
    283: "pencil", 284: "person", 285: "photo", 286: "piano", 287: "picture", 288: "pig",
    290: "pillow", 291: "pipe", 292: "pitcher", 293: "plant", 295: "plate", 304: "pool table",
    307: "pot", 309: "printer", 310: "projector", 314: "radiator", 315: "radio",
    319: "range hood", 323: "remote control", 329: "rope", 330: "rug", 331: "ruler",
    336: "scale", 342: "sculpture", 345: "sewing machine", 349: "shelves", 350: "shoe",
    351: "shopping cart", 352: "shovel", 355: "sign", 357: "sink", 368: "sofa", 370: "spatula",
    371: "speaker", 374: "spoon", 379: "stapler", 380: "stick", 383: "stool", 384: "stove",
    397: "table", 401: "tape", 403: "telephone", 405: "tent", 407: "toaster", 408: "toilet",
    411: "toothbrush", 412: "towel", 413: "toy", 414: "toy car", 417: "trampoline",
    419: "tray", 421: "tricycle", 423: "trophy", 427: "tvmonitor", 429: "typewriter",
    430: "umbrella", 432: "vacuum cleaner", 440: "wall", 441: "wallet", 442: "wardrobe",
    443: "washing machine", 444: "watch", 446: "water dispenser", 454: "window", 457: "wire",
}  # fmt: skip
_NORMALS_VALID_IDS = np.array(sorted(NORMALS_VALID_CLASSES))

# PASCAL-Part person part names -> the 6 groups used for the human-parts task.
PART_GROUPS: dict[str, int] = {
    **dict.fromkeys(
        ("head", "hair", "lear", "rear", "leye", "reye", "lebrow", "rebrow", "nose", "mouth"), 1
    ),
    **dict.fromkeys(("torso", "neck"), 2),
    **dict.fromkeys(("luarm", "ruarm"), 3),
    **dict.fromkeys(("llarm", "rlarm", "lhand", "rhand"), 4),
    **dict.fromkeys(("luleg", "ruleg"), 5),
    **dict.fromkeys(("llleg", "rlleg", "lfoot", "rfoot"), 6),
}


def split_path(root: Path, split: str) -> Path:
    return root / "ImageSets" / "Context" / f"{split}.txt"


def paths(root: Path, im_id: str) -> dict[str, Path]:
    """Files of one image. ``semseg`` falls back to semseg/VOC12 when only that exists."""
    semseg = root / "semseg" / "pascal-context" / f"{im_id}.png"
    voc12 = root / "semseg" / "VOC12" / f"{im_id}.png"
    if not semseg.is_file() and voc12.is_file():
        semseg = voc12
    return {
        "image": root / "JPEGImages" / f"{im_id}.jpg",
        "semseg": semseg,
        "label_map": root / "pascal-context" / "trainval" / f"{im_id}.mat",
        "human_parts": root / "human_parts" / f"{im_id}.mat",
        "normals": root / "normals_distill" / f"{im_id}.png",
        "sal": root / "sal_distill" / f"{im_id}.png",
    }


# --- edges: thinned Laplacian of LabelMap ------------------------------------------


def _thin_luts() -> tuple[np.ndarray, np.ndarray]:
    """Deletion tables of the two sub-iterations of Guo & Hall (1989) thinning.

    Index = 8-neighbourhood code (bit 0 east, then counter-clockwise: NE, N, NW, W,
    SW, S, SE); the same tables as skimage.morphology.thin, which the reference uses.
    """
    codes = np.arange(256)
    bits = [(codes >> i) & 1 for i in range(8)]
    g1 = sum(((1 - bits[i]) & (bits[i + 1] | bits[(i + 2) % 8])) for i in (0, 2, 4, 6)) == 1
    n1 = sum(bits[k] | bits[k - 1] for k in (1, 3, 5, 7))
    n2 = sum(bits[k] | bits[(k + 1) % 8] for k in (1, 3, 5, 7))
    g2 = np.isin(np.minimum(n1, n2), (2, 3))
    g3 = ((bits[1] | bits[2] | (1 - bits[7])) & bits[0]) == 0
    g3p = ((bits[5] | bits[6] | (1 - bits[3])) & bits[4]) == 0
    return g1 & g2 & g3, g1 & g2 & g3p


_THIN_LUTS = _thin_luts()
_NEIGHBOUR_WEIGHTS = np.array([[8, 4, 2], [16, 0, 1], [32, 64, 128]], dtype=np.uint8)


def thin(mask: np.ndarray) -> np.ndarray:
    """Thin a binary mask to 1-pixel-wide curves (skimage.morphology.thin equivalent)."""
    skel = mask.astype(np.uint8).copy()
    count = -1
    while count != int(skel.sum()):
        count = int(skel.sum())
        for lut in _THIN_LUTS:
            codes = ndimage.correlate(skel, _NEIGHBOUR_WEIGHTS, mode="constant")
            skel[lut[codes] & (skel > 0)] = 0
    return skel.astype(bool)


_LAPLACIAN = np.array([[0, 1, 0], [1, -4, 1], [0, 1, 0]], dtype=np.float64)


def edges_from_label_map(label_map: np.ndarray) -> np.ndarray:
    """Semantic boundaries: thin(|Laplacian(label_map)| > 0), as uint8 {0, 1}.

    ``mode="mirror"`` is OpenCV's default BORDER_REFLECT_101: no edge on the image border.
    """
    lap = ndimage.convolve(label_map.astype(np.float64), _LAPLACIAN, mode="mirror")
    return thin(np.abs(lap) > 0).astype(np.uint8)


# --- per-file loaders ---------------------------------------------------------------


def load_label_map(path: Path) -> np.ndarray:
    label_map = read_mat(path, "LabelMap")
    if label_map.ndim != 2:
        raise DataError(f"{path}: LabelMap must be 2-D, got shape {label_map.shape}")
    return label_map.astype(np.int32)


def _person_parts(path: Path, anno: np.ndarray) -> list[list[tuple[str, np.ndarray]]]:
    """[(part name, mask), ...] of each person (VOC class 15) that has parts."""
    try:
        persons = []
        for obj in anno[0][0][1][0]:
            if int(obj[1][0][0]) == PERSON and len(obj[3]) != 0:
                persons.append([(str(part[0][0]), part[1]) for part in obj[3][0]])
        return persons
    except (IndexError, TypeError, ValueError) as err:
        raise DataError(f"{path}: not a PASCAL-Part 'anno' struct ({err})") from err


def has_person_parts(path: Path) -> bool:
    """True if human_parts/<id>.mat holds a person with parts (the file must exist)."""
    return bool(_person_parts(path, read_mat(path, "anno")))


def load_human_parts(path: Path, shape: tuple[int, int]) -> np.ndarray:
    """6-group part map (0 background, 1..6); all 255 without a person with parts."""
    persons = _person_parts(path, read_mat(path, "anno"))
    if not persons:
        return np.full(shape, 255, dtype=np.uint8)
    target = np.zeros(shape, dtype=np.uint8)
    for parts in persons:
        for name, mask in parts:
            if name not in PART_GROUPS:
                raise DataError(f"{path}: unknown person part name {name!r}")
            if mask.shape != shape:
                raise DataError(f"{path}: part {name!r} mask {mask.shape} != image {shape}")
            target[mask.astype(bool)] = PART_GROUPS[name]
    return target


def load_normals(path: Path, label_map: np.ndarray) -> np.ndarray:
    """Distilled normals (unit length) on valid context classes, zeros elsewhere."""
    normals = 2.0 * read_image(path, "RGB").astype(np.float32) / 255.0 - 1.0
    if normals.shape[:2] != label_map.shape:
        raise DataError(f"{path}: size {normals.shape[:2]} != LabelMap {label_map.shape}")
    norm = np.linalg.norm(normals, axis=2)
    valid = np.isin(label_map, _NORMALS_VALID_IDS) & (norm > 0)
    normals = normals / np.maximum(norm, 1e-12)[..., None]
    return np.where(valid[..., None], normals, 0.0).astype(np.float32)


def load_sal(path: Path) -> np.ndarray:
    return (read_image(path, "L").astype(np.float32) / 255.0 > 0.5).astype(np.uint8)


def load_semseg(path: Path) -> np.ndarray:
    semseg = read_image(path)
    if semseg.ndim != 2:
        raise DataError(f"{path}: semseg png must be single-channel (L or P), got {semseg.shape}")
    if semseg.max(initial=0) > 255:
        raise DataError(f"{path}: semseg values must be 0..20 or 255, found {semseg.max()}")
    return semseg.astype(np.uint8)


class PascalContext(Dataset):
    """PASCAL-Context items: see mtshare.data.transforms.to_tensors for the layout.

    With ``tasks == ["human_parts"]`` only ids with a person that has parts are kept
    (found by reading every human_parts .mat of the split once, at construction).
    """

    def __init__(self, root: Path, split: str, tasks: list[str], train: bool, img_size: int):
        self.root, self.tasks, self.train, self.img_size = root, tasks, train, img_size
        ids = read_ids(split_path(root, split))
        if tasks == ["human_parts"]:
            ids = [i for i in ids if has_person_parts(paths(root, i)["human_parts"])]
            if not ids:
                raise DataError(f"{root / 'human_parts'}: no {split} image has a person with parts")
        self.ids = ids

    def __len__(self) -> int:
        return len(self.ids)

    def load(self, index: int) -> dict[str, np.ndarray]:
        """Raw sample (original resolution) for the requested tasks."""
        p = paths(self.root, self.ids[index])
        image = read_image(p["image"], "RGB")
        shape = image.shape[:2]
        sample = {"image": image}
        label_map = None
        if "normals" in self.tasks or "edge" in self.tasks:
            label_map = _check_shape(p["label_map"], load_label_map(p["label_map"]), shape)
        for task in self.tasks:
            if task == "semseg":
                sample[task] = _check_shape(p["semseg"], load_semseg(p["semseg"]), shape)
            elif task == "human_parts":
                sample[task] = load_human_parts(p["human_parts"], shape)
            elif task == "sal":
                sample[task] = _check_shape(p["sal"], load_sal(p["sal"]), shape)
            elif task == "normals":
                sample[task] = load_normals(p["normals"], label_map)
            elif task == "edge":
                sample[task] = edges_from_label_map(label_map)
        return sample

    def __getitem__(self, index: int) -> dict:
        return prepare(self.load(index), self.ids[index], self.train, self.img_size)


def _check_shape(path: Path, arr: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    if arr.shape[:2] != shape:
        raise DataError(f"{path}: size {arr.shape[:2]} does not match the image {shape}")
    return arr
