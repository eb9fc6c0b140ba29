"""The task table: each task module offers the same names (the seam), and only `pipeline` reads this table.

    load_splits, load_teacher, teacher_path, resolve_model_path, load_model, build_student, augment, transfer_set, encode,
    make_collate, logits_and_hidden,
    logits_for_loss, teacher_targets, validate, BEST, store_settings, summarise, write_outputs, check_store,
    training_examples, report, compare, save_model, count_params
"""

from hybridft.tasks import causal_lm, classification

TASKS = {"classification": classification, "causal_lm": causal_lm}
