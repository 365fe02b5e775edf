"""Tiny masked LMs and their tokenizers, built in code: RoBERTa with the RoBERTa-layout byte-level BPE
of `selprune_core.mlm_model` (<s>=0, <pad>=1, </s>=2, <unk>=3, <mask> last), and BERT with a WordPiece
tokenizer in BERT's layout ([PAD]=0, [UNK], [CLS], [SEP], [MASK]), so masking meets both places where
special ids live. Models are random-init, two layers deep, 32 wide, in eval mode."""

from __future__ import annotations

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoConfig, AutoModelForMaskedLM, PreTrainedModel, PreTrainedTokenizerFast

from selprune_core.mlm_measure import MaskedLM, masked_lm
from selprune_core.mlm_model import MlmRecipe, train_tokenizer
from tests.helpers import CORPUS

MLM_TYPES = ("roberta", "bert")
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
MAX_POSITIONS = 64
PROSE = [text for text in CORPUS if "(" not in text and ":" not in text]
CODE = [text for text in CORPUS if text not in PROSE]


def roberta_tokenizer() -> PreTrainedTokenizerFast:
    return train_tokenizer(MlmRecipe(vocab_size=320, max_tokens=MAX_POSITIONS - 2), CODE, PROSE)


def bert_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    trainer = trainers.WordPieceTrainer(vocab_size=200, special_tokens=specials, show_progress=False)
    tok.train_from_iterator(CORPUS, trainer=trainer)
    tok.post_processor = processors.BertProcessing(("[SEP]", 3), ("[CLS]", 2))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )


def build_mlm_model(model_type: str, tokenizer: PreTrainedTokenizerFast, seed: int = 0) -> PreTrainedModel:
    """A random-init two-layer, 32-wide *ForMaskedLM, its pad id the tokenizer's."""
    import torch

    config = AutoConfig.for_model(
        model_type,
        **TINY,
        vocab_size=len(tokenizer),
        max_position_embeddings=MAX_POSITIONS,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model: PreTrainedModel = AutoModelForMaskedLM.from_config(config)
    module: torch.nn.Module = model
    module.eval()
    return model


def tiny_mlm(model_type: str, seed: int = 0) -> MaskedLM:
    tokenizer = roberta_tokenizer() if model_type == "roberta" else bert_tokenizer()
    return masked_lm(build_mlm_model(model_type, tokenizer, seed), tokenizer)
