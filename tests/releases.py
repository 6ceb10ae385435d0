"""Miniature copies of the public releases' layouts as downloaded (file names, CSV columns and their quirks), filled
with the images and labels of a ChestX-ray14-format phantom, to test each reader against the real layout and the
readers against each other (the same images through two releases' files must score the same)."""

import csv
import hashlib
from pathlib import Path

import numpy as np
from PIL import Image

from dmfast.data.formats import open_dataset
from dmfast.data.dataset import FINDINGS
from dmfast.testing import write_dicom

# The 14 -> the release's own names (the readers' mappings, inverted; Nodule and Mass are VinDr's one class).
VINDR_NAME = {"Effusion": "Pleural effusion", "Fibrosis": "Pulmonary fibrosis", "Pleural_Thickening":
              "Pleural thickening", "Nodule": "Nodule/Mass", "Mass": "Nodule/Mass"}
VINDR_BOXED = ("Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumothorax",
               "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening")  # Pneumonia is global
VINDR_LABEL_COLUMNS = ("Aortic enlargement", "Atelectasis", "Calcification", "Cardiomegaly", "Clavicle fracture",
                       "Consolidation", "Edema", "Emphysema", "Enlarged PA", "ILD", "Infiltration", "Lung Opacity",
                       "Lung cavity", "Lung cyst", "Mediastinal shift", "Nodule/Mass", "Pleural effusion",
                       "Pleural thickening", "Pneumothorax", "Pulmonary fibrosis", "Rib fracture", "Other lesion",
                       "COPD", "Lung tumor", "Pneumonia", "Tuberculosis", "Other diseases", "No finding")
CHEXPERT_LABELS = ("No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
                   "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other",
                   "Fracture", "Support Devices")
CHEXPERT_NAME = {"Effusion": "Pleural Effusion"}


def write_csv(path: Path, header, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
    return path


def image_id(name: str) -> str:
    """A VinDr-like (32 hex) or RSNA-like id for a phantom image name."""
    return hashlib.md5(name.encode()).hexdigest()


def dicom_of(png: Path, path: Path) -> Path:
    """The PNG's pixels as an 8-bit MONOCHROME2 DICOM whose display transform gives back the same values."""
    pixels = np.asarray(Image.open(png).convert("L"))
    return write_dicom(path, pixels, WindowCenter=127.5, WindowWidth=255, VOILUTFunction="LINEAR_EXACT")


def _image_boxes(dataset, name: str) -> list:
    """(finding, x0, y0, x1, y1) of an image in its own pixels, as ChestX-ray14's release space maps them."""
    return dataset.boxes_xyxy(space="release").get(name, [])


def _record(dataset, name: str):
    return next(r for r in dataset.records if r.image == name)


def vindr(source, out, readers=("R8",)) -> Path:
    """``source`` (a phantom) as VinDr-CXR on PhysioNet: ``train/`` and ``test/`` DICOMs named by image_id,
    ``annotations/``: the train files with every reader's box and labels (``readers`` each draw the same box), the
    test files as the five readers' consensus (no reader column; the last label column spelled "Other disease").
    Returns ``out``."""
    dataset, out = open_dataset(source), Path(out)
    for split, names in (("train", dataset.train_val), ("test", dataset.test)):
        annotations, labels = [], []
        who = readers if split == "train" else ("",)
        for name in (n for n in dataset.images if n in names):
            iid = image_id(name)
            dicom_of(dataset.paths[name], out / split / f"{iid}.dicom")
            record, boxes = _record(dataset, name), _image_boxes(dataset, name)
            for reader in who:
                for finding, x0, y0, x1, y1 in boxes:
                    if FINDINGS[finding] in VINDR_BOXED:
                        vname = VINDR_NAME.get(FINDINGS[finding], FINDINGS[finding])
                        annotations.append([iid, reader, vname, repr(x0), repr(y0), repr(x1), repr(y1)])
                if not record.labels.any():
                    annotations.append([iid, reader, "No finding", "", "", "", ""])
                row = dict.fromkeys(VINDR_LABEL_COLUMNS, 0)
                for finding in np.flatnonzero(record.labels == 1):
                    name14 = FINDINGS[finding]
                    if name14 != "Hernia":
                        row[VINDR_NAME.get(name14, name14)] = 1
                row["No finding"] = int(not record.labels.any())
                labels.append([iid, reader, *row.values()] if reader else [iid, *row.values()])
        reader_column = ["rad_id"] if split == "train" else []
        columns = [c if split == "train" or c != "Other diseases" else "Other disease" for c in VINDR_LABEL_COLUMNS]
        write_csv(out / "annotations" / f"annotations_{split}.csv",
                  ["image_id", *reader_column, "class_name", "x_min", "y_min", "x_max", "y_max"],
                  [[r[0], *r[1:]] if reader_column else [r[0], *r[2:]] for r in annotations])
        write_csv(out / "annotations" / f"image_labels_{split}.csv", ["image_id", *reader_column, *columns], labels)
    return out


def rsna(source, out, names=None, mapping=False) -> Path:
    """The ``names`` of ``source`` (default all) as the RSNA Pneumonia challenge: ``stage_2_train_images/*.dcm``,
    ``stage_2_train_labels.csv`` (a row per Pneumonia box, one empty row with Target 0 per negative image),
    ``stage_2_detailed_class_info.csv``, and with ``mapping`` the challenge's file of the ChestX-ray14 names."""
    dataset, out = open_dataset(source), Path(out)
    rows, ids = [], {}
    pneumonia = FINDINGS.index("Pneumonia")
    for name in (n for n in dataset.images if names is None or n in names):
        pid = image_id(name)[:8] + "-" + image_id(name)[8:12] + "-" + image_id(name)[12:16] + "-" + \
            image_id(name)[16:20] + "-" + image_id(name)[20:32]
        dicom_of(dataset.paths[name], out / "stage_2_train_images" / f"{pid}.dcm")
        ids[name] = pid, bool(_record(dataset, name).labels[pneumonia])
        boxes = [b for b in _image_boxes(dataset, name) if b[0] == pneumonia]
        if _record(dataset, name).labels[pneumonia] == 1:
            rows += [[pid, repr(x0), repr(y0), repr(x1 - x0), repr(y1 - y0), 1] for _, x0, y0, x1, y1 in boxes]
        else:
            rows.append([pid, "", "", "", "", 0])
    write_csv(out / "stage_2_train_labels.csv", ["patientId", "x", "y", "width", "height", "Target"], rows)
    classes = [[pid, "Lung Opacity" if target else "Normal" if not _record(dataset, name).labels.any() else
                "No Lung Opacity / Not Normal"] for name, (pid, target) in ids.items()]
    write_csv(out / "stage_2_detailed_class_info.csv", ["patientId", "class"], classes)
    if mapping:  # its real fields; img_id without the suffix
        import json

        (out / "pneumonia-challenge-dataset-mappings_2018.json").write_text(json.dumps(
            [{"img_id": name[:-4], "subset_img_id": pid, "orig_labels": [], "StudyInstanceUID": f"1.2.{n}"}
             for n, (name, (pid, _)) in enumerate(ids.items())]))
    (out / "stage_2_test_images").mkdir(exist_ok=True)  # unlabelled in the challenge: not read
    return out


def chexpert_cells(labels: np.ndarray, uncertain: set, blank: set) -> list:
    """The 14 CheXpert label cells of a 14-finding label vector: ``1.0``/``0.0``, ``-1.0`` for the findings in
    ``uncertain``, empty for those in ``blank`` and for the labels without a counterpart."""
    cells = []
    for label in CHEXPERT_LABELS:
        finding = next((f for f in FINDINGS if CHEXPERT_NAME.get(f, f) == label), None)
        if label == "No Finding":
            cells.append("1.0" if not labels.any() and not uncertain else "")
        elif finding is None or finding in blank:
            cells.append("")
        elif finding in uncertain:
            cells.append("-1.0")
        else:
            cells.append(f"{float(labels[FINDINGS.index(finding)]):.1f}")
    return cells


def chexpert(source, out, uncertain=None, lateral=True) -> Path:
    """``source`` as CheXpert-v1.0-small: JPEGs at ``train/patientNNNNN/studyN/view1_frontal.jpg`` listed in
    ``train.csv`` / ``valid.csv`` by a Path that starts with the release folder's name. ``uncertain`` maps image
    names to findings written as -1.0; with ``lateral`` each train patient also gets a lateral view."""
    dataset, folder = open_dataset(source), Path(out) / "CheXpert-v1.0-small"
    header = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *CHEXPERT_LABELS]
    for split, names, csv_name in (("train", dataset.train_val, "train.csv"), ("valid", dataset.test, "valid.csv")):
        rows, studies = [], {}
        for name in (n for n in dataset.images if n in names):
            record = _record(dataset, name)
            study = studies[record.patient] = studies.get(record.patient, 0) + 1
            relative = f"{split}/patient{record.patient:05d}/study{study}/view1_frontal.jpg"
            (folder / relative).parent.mkdir(parents=True, exist_ok=True)
            Image.open(dataset.paths[name]).convert("L").save(folder / relative, quality=95)
            cells = chexpert_cells(record.labels, set((uncertain or {}).get(name, ())), set())
            rows.append([f"CheXpert-v1.0-small/{relative}", "Female", 60, "Frontal", "PA", *cells])
            if lateral and split == "train":
                rows.append([f"CheXpert-v1.0-small/{relative.replace('view1_frontal', 'view2_lateral')}", "Female",
                             60, "Lateral", "", *cells])
        write_csv(folder / csv_name, header, rows)
    return Path(out)


def mimic(source, out, uncertain=None, unlabelled=()) -> Path:
    """``source`` as MIMIC-CXR-JPG: ``files/pNN/pSUBJECT/sSTUDY/DICOM_ID.jpg``, the gzipped label (per study),
    split and metadata CSVs; some train images also have a lateral (LL) view; the studies of the images
    ``unlabelled`` have no label row."""
    import gzip

    dataset, out = open_dataset(source), Path(out)
    labels, split_rows, metadata = [], [], []
    for n, name in enumerate(dataset.images):
        record = _record(dataset, name)
        subject, study, dicom = 10000000 + record.patient, 50000000 + n, image_id(name)[:8] + "-" + image_id(name)[8:16]
        path = out / "files" / f"p{str(subject)[:2]}" / f"p{subject}" / f"s{study}" / f"{dicom}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.open(dataset.paths[name]).convert("L").save(path, quality=95)
        split = "test" if name in dataset.test else "validate" if n % 7 == 0 else "train"
        split_rows.append([dicom, study, subject, split])
        metadata.append([dicom, subject, study, "PA", 512, 512])
        if name not in unlabelled:
            labels.append([subject, study, *chexpert_cells(record.labels, set((uncertain or {}).get(name, ())),
                                                           set())])
        if split == "train" and n % 5 == 0:
            split_rows.append([dicom + "L", study, subject, split])
            metadata.append([dicom + "L", subject, study, "LL", 512, 512])
    for name, header, rows in (("chexpert", ["subject_id", "study_id", *CHEXPERT_LABELS], labels),
                               ("split", ["dicom_id", "study_id", "subject_id", "split"], split_rows),
                               ("metadata", ["dicom_id", "subject_id", "study_id", "ViewPosition", "Rows",
                                             "Columns"], metadata)):
        text = write_csv(out / f"mimic-cxr-2.0.0-{name}.csv", header, rows).read_bytes()
        (out / f"mimic-cxr-2.0.0-{name}.csv.gz").write_bytes(gzip.compress(text))
        (out / f"mimic-cxr-2.0.0-{name}.csv").unlink()
    return out


def generic(source, out) -> Path:
    """``source`` in the generic format: PNGs under ``images/``, ``labels.csv`` (image, patient, split, the 14) and
    ``boxes.csv`` in the images' own pixels."""
    import shutil

    dataset, out = open_dataset(source), Path(out)
    rows, boxes = [], []
    for name in dataset.images:
        record = _record(dataset, name)
        shutil.copy(dataset.paths[name], (out / "images").mkdir(parents=True, exist_ok=True) or out / "images" / name)
        split = "test" if name in dataset.test else "train"
        rows.append([f"images/{name}", record.patient, split, *map(int, record.labels)])
        boxes += [[f"images/{name}", FINDINGS[f], repr(x0), repr(y0), repr(x1), repr(y1)]
                  for f, x0, y0, x1, y1 in _image_boxes(dataset, name)]
    write_csv(out / "labels.csv", ["image", "patient", "split", *FINDINGS], rows)
    write_csv(out / "boxes.csv", ["image", "finding", "x_min", "y_min", "x_max", "y_max"], boxes)
    return out
