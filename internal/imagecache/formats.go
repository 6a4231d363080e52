package imagecache

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
)

// readHeader reads the first n bytes of a regular file and its size.
func readHeader(path string, n int) ([]byte, int64, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, 0, err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return nil, 0, err
	}
	if !fi.Mode().IsRegular() {
		return nil, 0, fmt.Errorf("%s is not a regular file", path)
	}
	b := make([]byte, n)
	if _, err := io.ReadFull(f, b); err != nil {
		return nil, 0, fmt.Errorf("%s: too short for an image: %w", path, err)
	}
	return b, fi.Size(), nil
}

// ValidSquashFS checks a SquashFS file's superblock: the magic, and that
// the file is as long as the superblock says (a truncated copy is not).
func ValidSquashFS(path string) error {
	b, size, err := readHeader(path, 96)
	if err != nil {
		return err
	}
	if string(b[:4]) != "hsqs" {
		return errors.New("not a SquashFS file (bad magic)")
	}
	if used := binary.LittleEndian.Uint64(b[40:48]); uint64(size) < used {
		return fmt.Errorf("truncated SquashFS file: %d bytes, the superblock says %d", size, used)
	}
	return nil
}

// ValidSIF checks a SIF file's global header: the magic, and that the file
// holds all the data the header announces.
func ValidSIF(path string) error {
	b, size, err := readHeader(path, 128)
	if err != nil {
		return err
	}
	if string(b[32:41]) != "SIF_MAGIC" {
		return errors.New("not a SIF file (bad magic)")
	}
	dataOff := int64(binary.LittleEndian.Uint64(b[112:120]))
	dataLen := int64(binary.LittleEndian.Uint64(b[120:128]))
	if dataOff < 0 || dataLen < 0 || size < dataOff+dataLen {
		return fmt.Errorf("truncated SIF file: %d bytes, the header says %d", size, dataOff+dataLen)
	}
	return nil
}
