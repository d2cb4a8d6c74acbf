"""int8 you can trust and fix: measure, explain and repair quantization error.

Modules (import the one you need; this package imports nothing at import time):

    stats       the accuracy drop from paired predictions, with a confidence interval, the worst
                class and an "inconclusive" verdict with the images needed (numpy only)
    layers      the per-layer report (accumulated and isolated error per layer, ranked, explained);
                report.layer_report() builds it for a TFLite, ONNX or Core ML int8 artifact
    render      the report as a table, Markdown and an HTML page with an inline SVG plot
    fallback    recovery: keep the worst layers in float until a budget holds (TFLite, ONNX)
    holdout     label-free budgets: agreement with the float model on held-out calibration images
    outputs     "no speed figure without correct outputs": a bench row's outputs against the CPU's
    equalize    cross-layer equalization of a Keras model (BN folded first), bias correction
    sources     the calls into export/ (float references, TFLite's quantization debugger)
"""
