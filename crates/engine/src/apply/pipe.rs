//! An in-process pipe with a bounded buffer of 1 MiB: between the thread that patches a
//! layer's tar and the thread that compresses it byte for byte, or hashes and writes it.
//!
//! Through an OS pipe (64 KiB) with a `BufWriter` and a `BufReader` at its ends, each byte was
//! copied four times, and every 64 KiB cost two system calls and a wake-up of the other
//! thread. Here each byte is copied twice (into a 256 KiB buffer and out of it), buffers
//! change hands without a system call unless a thread waits, and the patch can run 1 MiB
//! ahead. The byte-exact apply of debian-update at `--jobs 1` went
//! from 3.4-3.5 s to 2.8-2.9 s (system time halved). Memory: at most [`PIPE_BUFFERS`] ×
//! [`PIPE_BUFFER_BYTES`] in flight, plus one buffer at each end; the reader hands emptied
//! buffers back to the writer, so they are allocated once.

use std::io::{self, Read, Write};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TryRecvError};

/// Bytes per buffer handed from the writer to the reader.
pub const PIPE_BUFFER_BYTES: usize = 256 << 10;
/// Buffers in flight: the writer blocks when this many are waiting (1 MiB). Measured on
/// debian-update's apply: 1 MiB gave the whole gain of 4 MiB, at 4 MiB less memory per layer.
pub const PIPE_BUFFERS: usize = 4;

/// Creates a pipe: what is written to the [`PipeWriter`] is read from the [`PipeReader`].
/// Dropping the writer ends the reader's input; dropping the reader makes writes fail with
/// [`io::ErrorKind::BrokenPipe`], as an OS pipe's would.
pub fn pipe() -> (PipeWriter, PipeReader) {
    let (tx, rx) = sync_channel(PIPE_BUFFERS);
    let (back_tx, back_rx) = sync_channel(PIPE_BUFFERS + 1);
    (PipeWriter { tx, back: back_rx, buf: Vec::with_capacity(PIPE_BUFFER_BYTES) }, PipeReader { rx, back: back_tx, buf: Vec::new(), pos: 0 })
}

/// The writing end of a [`pipe`]: buffers writes and hands over full buffers.
#[derive(Debug)]
pub struct PipeWriter {
    tx: SyncSender<Vec<u8>>,
    /// Buffers the reader has emptied.
    back: Receiver<Vec<u8>>,
    buf: Vec<u8>,
}

impl PipeWriter {
    fn send(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let next = match self.back.try_recv() {
            Ok(mut empty) => {
                empty.clear();
                empty
            }
            Err(TryRecvError::Empty | TryRecvError::Disconnected) => Vec::with_capacity(PIPE_BUFFER_BYTES),
        };
        let full = std::mem::replace(&mut self.buf, next);
        self.tx.send(full).map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the reading end of the pipe is closed"))
    }
}

impl Write for PipeWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if self.buf.len() == PIPE_BUFFER_BYTES {
            self.send()?;
        }
        let n = data.len().min(PIPE_BUFFER_BYTES - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        Ok(n)
    }

    /// Hands over what is buffered.
    fn flush(&mut self) -> io::Result<()> {
        self.send()
    }
}

impl Drop for PipeWriter {
    /// Hands over what is buffered, as `BufWriter` does; a reader that is gone is ignored.
    fn drop(&mut self) {
        let _ = self.send();
    }
}

/// The reading end of a [`pipe`].
#[derive(Debug)]
pub struct PipeReader {
    rx: Receiver<Vec<u8>>,
    /// Where emptied buffers go back to the writer.
    back: SyncSender<Vec<u8>>,
    buf: Vec<u8>,
    pos: usize,
}

impl PipeReader {
    /// Writes everything still to come from the writer to `out`, each buffer as it arrives
    /// (one write of up to [`PIPE_BUFFER_BYTES`], no copy through a read buffer), until the
    /// writer is gone. Returns the number of bytes written. On an error of `out`, dropping
    /// the reader makes the writer's next write fail.
    pub fn copy_to(self, out: &mut dyn Write) -> io::Result<u64> {
        let mut total = (self.buf.len() - self.pos) as u64;
        out.write_all(&self.buf[self.pos..])?;
        while let Ok(buf) = self.rx.recv() {
            out.write_all(&buf)?;
            total += buf.len() as u64;
            // Dropped instead when the writer is gone or has enough.
            let _ = self.back.try_send(buf);
        }
        Ok(total)
    }
}

impl Read for PipeReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if out.is_empty() {
            return Ok(0);
        }
        while self.pos == self.buf.len() {
            match self.rx.recv() {
                Ok(buf) => {
                    let empty = std::mem::replace(&mut self.buf, buf);
                    self.pos = 0;
                    // Dropped instead when the writer is gone or has enough.
                    let _ = self.back.try_send(empty);
                }
                // Every writer is gone: the end of input.
                Err(_) => return Ok(0),
            }
        }
        let n = out.len().min(self.buf.len() - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_arrive_in_order_and_dropping_the_writer_ends_the_input() {
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
        let (mut w, mut r) = pipe();
        let read = std::thread::scope(|s| {
            let reader = s.spawn(move || {
                let mut got = Vec::new();
                r.read_to_end(&mut got).unwrap();
                got
            });
            // Odd-sized writes across buffer boundaries, and a flush part way.
            for (i, piece) in data.chunks(70_001).enumerate() {
                w.write_all(piece).unwrap();
                if i == 3 {
                    w.flush().unwrap();
                }
            }
            drop(w);
            reader.join().unwrap()
        });
        assert_eq!(read, data);
    }

    #[test]
    fn copy_to_writes_everything_after_what_was_read() {
        let data: Vec<u8> = (0..3 * PIPE_BUFFER_BYTES as u32 + 77).map(|i| (i % 251) as u8).collect();
        let (mut w, mut r) = pipe();
        let sent = data.clone();
        let writer = std::thread::spawn(move || w.write_all(&sent));
        let mut head = [0u8; 10];
        r.read_exact(&mut head).unwrap();
        let mut rest = Vec::new();
        assert_eq!(r.copy_to(&mut rest).unwrap(), data.len() as u64 - 10);
        writer.join().unwrap().unwrap();
        assert_eq!(head[..], data[..10]);
        assert_eq!(rest, data[10..]);
    }

    #[test]
    fn copy_to_a_failing_output_breaks_the_pipe() {
        struct Full;
        impl Write for Full {
            fn write(&mut self, _: &[u8]) -> io::Result<usize> {
                Err(io::Error::other("disk full"))
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let (mut w, r) = pipe();
        let writer = std::thread::spawn(move || (0..64).try_for_each(|_| w.write_all(&[7; PIPE_BUFFER_BYTES])));
        assert_eq!(r.copy_to(&mut Full).unwrap_err().to_string(), "disk full");
        assert_eq!(writer.join().unwrap().unwrap_err().kind(), io::ErrorKind::BrokenPipe);
    }

    #[test]
    fn dropping_the_writer_hands_over_what_it_buffered() {
        let (mut w, mut r) = pipe();
        w.write_all(b"flushed, ").unwrap();
        w.flush().unwrap();
        w.write_all(b"then dropped").unwrap();
        drop(w);
        let mut got = Vec::new();
        r.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"flushed, then dropped");
    }

    #[test]
    fn writing_after_the_reader_is_gone_is_a_broken_pipe() {
        let (mut w, r) = pipe();
        drop(r);
        let err = w.write_all(&vec![0u8; PIPE_BUFFER_BYTES * 2]).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::BrokenPipe);
    }
}
