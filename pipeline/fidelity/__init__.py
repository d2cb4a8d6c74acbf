"""int8 you can trust and fix: measure, explain and repair quantization error.

Modules (import the one you need; this package imports nothing at import time):

    stats       the accuracy drop from paired predictions, with a confidence interval, the worst
                class and an "inconclusive" verdict with the images needed (numpy only)
    layers      the per-layer report (accumulated and isolated error per layer, ranked, explained);
                report.layer_report() builds it for a TFLite, ONNX or Core ML int8 artifact;
                layer_rows holds its records (layers.json)
    render      the report as a table, Markdown and an HTML page with an inline SVG plot
    fallback    recovery: keep the worst layers in float until a budget holds (TFLite, ONNX)
    holdout     label-free budgets: agreement with the float model on held-out calibration images
    equalize    cross-layer equalization of a Keras model (BN folded first), bias correction
    ptq         what the export applies before converting (equalization on by default), checked and recorded
    sources     the calls into export/ (float references, TFLite's quantization debugger, ONNX's quantizer)

The output check of bench rows ("no speed figure without correct outputs") lives in
pipeline/base/outputs.py, where devices/ can use it. The stages that use this package: export
(ptq, recovery: pipeline/recover_judges.py, recover_fallback.py), check (stats, pipeline/gate.py),
eval (stats.class_counts for eval.json's counts) and inspect --layers (pipeline/inspect_layers.py).
"""
