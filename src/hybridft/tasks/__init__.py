"""Task modules: each turns its batches into (student_logits [N, C], teacher_logits [N, C], labels [N])."""

from hybridft.tasks import classification

TASKS = {"classification": classification}
