//! GGUF files: the container ([`reader`]), the conversion to a Hugging Face layout with tensors
//! dequantized or kept in their GGML blocks ([`convert`]), and a writer ([`writer`]) for test
//! files and quantized copies made by the project's own quantizer.

pub mod convert;
pub mod reader;
pub mod writer;

mod bpe;

pub use convert::{convert, convert_file, dequantize, Converted, Tensors};
pub use reader::{GgmlType, GgufFile, GgufTensor, GgufValue};

#[cfg(test)]
mod tests;
