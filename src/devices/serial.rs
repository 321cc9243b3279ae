//! The 16550 serial console (vm-superio) at COM1, writing guest output to
//! stdout or a file. Built-in guests have no interrupts, so the interrupt
//! trigger does nothing. Console output is not held for output commit: it is
//! a debugging aid, not an acknowledgement to a client.
//!
//! Output goes out a line at a time ([`LineCarry`]): a line the guest has
//! not finished when the VM stops is saved with the serial state and
//! completed after the resume, so a stopped run's log never ends in a cut
//! line (`counter 0 2562` for `counter 0 25625822`).

use std::io::Write;

use serde::{Deserialize, Serialize};
use vm_superio::serial::{NoEvents, SerialState as SuperioState};
use vm_superio::{Serial, Trigger};

/// Errors of the serial console.
#[derive(Debug, thiserror::Error)]
pub enum SerialError {
    /// The saved state is not a valid 16550 state.
    #[error("serial state is invalid")]
    BadState,
}

/// An interrupt line that goes nowhere (the built-in ABI has no interrupts).
pub struct NoIrq;

impl Trigger for NoIrq {
    type E = std::io::Error;
    fn trigger(&self) -> Result<(), Self::E> {
        Ok(())
    }
}

/// Longest line held back: a longer one goes out unfinished.
pub const MAX_LINE: usize = 1024;

/// Guest output, written out through the last newline; the unfinished rest
/// of a line waits for its newline (or [`MAX_LINE`] bytes).
pub struct LineCarry {
    out: Box<dyn Write + Send>,
    line: Vec<u8>,
}

impl Write for LineCarry {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.line.extend_from_slice(b);
        let upto = match self.line.iter().rposition(|&c| c == b'\n') {
            Some(nl) => nl + 1,
            None if self.line.len() >= MAX_LINE => self.line.len(),
            None => return Ok(b.len()),
        };
        // The bytes are ours once accepted: a failing console loses them
        // rather than stalling the guest (as a real UART would).
        let r = self.out.write_all(&self.line[..upto]);
        self.line.drain(..upto);
        r.map(|()| b.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

/// The console device.
pub struct Console {
    uart: Serial<NoIrq, NoEvents, LineCarry>,
}

/// Saved 16550 registers (a serde mirror of vm-superio's `SerialState`)
/// and the unfinished output line.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialState {
    /// DLL, DLH, IER, IIR, LCR, LSR, MCR, MSR, SCR.
    pub regs: [u8; 9],
    /// Pending input bytes.
    pub in_buffer: Vec<u8>,
    /// Output the guest wrote after its last newline (at most [`MAX_LINE`]
    /// bytes), written out when the line is finished after a resume.
    pub line: Vec<u8>,
}

impl Console {
    /// A console in its power-on state writing to `out`.
    pub fn new(out: Box<dyn Write + Send>) -> Self {
        Console {
            uart: Serial::new(
                NoIrq,
                LineCarry {
                    out,
                    line: Vec::new(),
                },
            ),
        }
    }

    /// Rebuild a console from saved registers.
    pub fn restore(out: Box<dyn Write + Send>, s: &SerialState) -> Result<Self, SerialError> {
        if s.in_buffer.len() > 64 || s.line.len() > MAX_LINE {
            return Err(SerialError::BadState);
        }
        let r = s.regs;
        let st = SuperioState {
            baud_divisor_low: r[0],
            baud_divisor_high: r[1],
            interrupt_enable: r[2],
            interrupt_identification: r[3],
            line_control: r[4],
            line_status: r[5],
            modem_control: r[6],
            modem_status: r[7],
            scratch: r[8],
            in_buffer: s.in_buffer.clone(),
        };
        let out = LineCarry {
            out,
            line: s.line.clone(),
        };
        let uart =
            Serial::from_state(&st, NoIrq, NoEvents, out).map_err(|_| SerialError::BadState)?;
        Ok(Console { uart })
    }

    /// Save the registers.
    pub fn save(&self) -> SerialState {
        let s = self.uart.state();
        SerialState {
            regs: [
                s.baud_divisor_low,
                s.baud_divisor_high,
                s.interrupt_enable,
                s.interrupt_identification,
                s.line_control,
                s.line_status,
                s.modem_control,
                s.modem_status,
                s.scratch,
            ],
            in_buffer: s.in_buffer,
            line: self.uart.writer().line.clone(),
        }
    }

    /// Guest reads register `offset` (0..8).
    pub fn read(&mut self, offset: u8) -> u8 {
        self.uart.read(offset)
    }

    /// Guest writes register `offset` (0..8).
    pub fn write(&mut self, offset: u8, value: u8) {
        let _ = self.uart.write(offset, value);
    }

    /// Flush the finished lines (the unfinished one stays, see [`LineCarry`]).
    pub fn flush(&mut self) {
        let _ = self.uart.writer_mut().flush();
    }

    /// The guest is gone for good: write out its unfinished line too.
    pub fn finish(&mut self) {
        let w = self.uart.writer_mut();
        let line = std::mem::take(&mut w.line);
        let _ = w.out.write_all(&line);
        let _ = w.out.flush();
    }
}

/// What [`Console`]'s restore needs besides its state: where output goes.
pub type ConsoleArgs = Box<dyn Write + Send>;

impl crate::persist::Persist<'_> for Console {
    type State = SerialState;
    type Args = ConsoleArgs;
    type Error = SerialError;

    fn save(&self) -> Result<SerialState, SerialError> {
        Ok(Console::save(self))
    }

    fn restore(out: ConsoleArgs, state: &SerialState) -> Result<Self, SerialError> {
        Console::restore(out, state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn thr_writes_reach_the_output() {
        let sink = Sink::default();
        let mut c = Console::new(Box::new(sink.clone()));
        for b in b"hi\n" {
            c.write(0, *b);
        }
        assert_eq!(&*sink.0.lock().unwrap(), b"hi\n");
    }

    #[test]
    fn an_unfinished_line_is_carried_across_save_and_restore() {
        let before = Sink::default();
        let mut c = Console::new(Box::new(before.clone()));
        for b in b"counter 0 12\ncounter 0 25" {
            c.write(0, *b);
        }
        c.flush();
        assert_eq!(&*before.0.lock().unwrap(), b"counter 0 12\n", "no cut line");
        let s = c.save();
        assert_eq!(s.line, b"counter 0 25");
        let after = Sink::default();
        let mut c = Console::restore(Box::new(after.clone()), &s).unwrap();
        for b in b"625822\n" {
            c.write(0, *b);
        }
        assert_eq!(&*after.0.lock().unwrap(), b"counter 0 25625822\n");
        // A too long saved line is refused; a guest that stops writes it out.
        let bad = SerialState {
            line: vec![b'x'; MAX_LINE + 1],
            ..s.clone()
        };
        assert!(Console::restore(Box::new(Sink::default()), &bad).is_err());
        let out = Sink::default();
        let mut c = Console::restore(Box::new(out.clone()), &s).unwrap();
        c.finish();
        assert_eq!(&*out.0.lock().unwrap(), b"counter 0 25");
    }

    #[test]
    fn a_line_longer_than_max_line_goes_out_unfinished() {
        let sink = Sink::default();
        let mut c = Console::new(Box::new(sink.clone()));
        for _ in 0..MAX_LINE {
            c.write(0, b'.');
        }
        assert_eq!(sink.0.lock().unwrap().len(), MAX_LINE);
        assert!(c.save().line.is_empty());
    }

    #[test]
    fn save_restore_save_is_identity() {
        let mut c = Console::new(Box::new(Sink::default()));
        c.write(3, 0x83); // DLAB
        c.write(0, 0x01);
        c.write(3, 0x03);
        c.write(7, 0x5a); // scratch
        let s1 = c.save();
        let c2 = Console::restore(Box::new(Sink::default()), &s1).unwrap();
        assert_eq!(c2.save(), s1);
        assert_eq!(s1.regs[8], 0x5a);
    }
}
