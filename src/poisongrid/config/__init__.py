"""The grid's configuration: load, default-fill and validate it (load.py); cut it into the small
spec each stage needs (specs.py); what each job asks the scheduler for (cluster.py); the figures
the aggregate draws for it (figures.py).

The Snakefile and the CLI share these functions, so a stage run by hand sees exactly what
Snakemake would pass it, and each rule's params hold only what changes that stage's output.
"""
from .cluster import (DATA_PARALLEL_STAGES, GPU_STAGES, dataset_scale, detector_scale, epoch_minutes, estimated_minutes,
                      group_components, launcher, on_gpu, resources, share_group)
from .figures import (capacity_swept, figure_name, figure_names, model_of_path, single_multi_pairs, swept_detectors,
                      trajectory_detector_types)
from .load import MIN_TRAJECTORY_EPOCHS, SCHEMA, check_data, load, warnings, parse_overrides, read_yaml, results_dir, typed_overrides, validate
from .specs import (CLEAN, KNOWN_NUM_CLASSES, KNOWN_TEST_SIZES, KNOWN_TRAIN_SIZES, TRAIN_KEYS, WHERE_KEYS,
                    bona_fide_key, bona_fide_of, bona_fide_set, bona_fide_sets, cells, dataset_entry, dataset_spec,
                    defender_model_spec, defense_applies, defense_entry, final_training_spec, n_clean_of,
                    resolved_bona_fide, runtime_spec, scenario_attacks, scenario_seeds, stage_spec, train_size,
                    training_spec, validation_spec)

__all__ = ["CLEAN", "DATA_PARALLEL_STAGES", "GPU_STAGES", "KNOWN_NUM_CLASSES", "KNOWN_TEST_SIZES", "KNOWN_TRAIN_SIZES",
           "SCHEMA", "TRAIN_KEYS", "WHERE_KEYS", "bona_fide_key", "bona_fide_of", "bona_fide_set", "bona_fide_sets",
           "capacity_swept", "cells", "dataset_entry", "dataset_scale", "dataset_spec", "defender_model_spec",
           "defense_applies", "defense_entry", "detector_scale", "epoch_minutes", "estimated_minutes", "figure_name", "figure_names",
           "final_training_spec", "group_components", "launcher", "load", "model_of_path", "n_clean_of", "on_gpu",
           "read_yaml", "resolved_bona_fide", "resources", "results_dir", "runtime_spec", "scenario_attacks", "scenario_seeds",
           "share_group", "single_multi_pairs", "stage_spec", "swept_detectors", "train_size", "training_spec",
           "trajectory_detector_types", "MIN_TRAJECTORY_EPOCHS", "check_data", "parse_overrides", "warnings", "typed_overrides", "validate", "validation_spec"]
